"""Stale text: what the code's docstrings and comments point to must exist in the repository (a
fork has nothing else), and the README's and docs' links to local files must resolve."""
import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*REPO.glob("*.py"), *REPO.glob("vkd/*.py"), *REPO.glob("config/*.py"),
                  *REPO.glob("tests/*.py")])
# lower-case words with underscores in prose that name no code of this repository on purpose
# (maths with one-letter subscripts is skipped by the pattern): names from elsewhere
OUTSIDE_NAMES = {"drop_last", "find_unused_parameters"}    # options of PyTorch's DataLoader and DDP


def prose_and_code(path):
    """(docstrings and comments, set of every word that appears in the code itself) of one Python
    file."""
    source = path.read_text(encoding="utf-8")
    docstring_starts = {(node.body[0].lineno, node.body[0].col_offset)
                        for node in ast.walk(ast.parse(source))
                        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                             ast.AsyncFunctionDef))
                        and ast.get_docstring(node, clean=False) is not None}
    prose, code_words = [], set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING
                                              and token.start in docstring_starts):
            prose.append(token.string)
        else:
            code_words.update(re.findall(r"\w+", token.string))
    return "\n".join(prose), code_words


def test_every_file_a_docstring_or_comment_names_exists():
    missing = []
    for path in SOURCES:
        prose, _ = prose_and_code(path)
        # documents and code a reader opens
        for name in re.findall(r"[\w./-]+\.(?:md|py)\b", prose):
            candidates = [REPO / name, REPO / "docs" / name, REPO / "vkd" / name,
                          path.parent / name]
            if not any(candidate.exists() for candidate in candidates):
                missing.append(f"{path.name}: {name}")
    assert not missing, f"docstrings/comments name files that are not in the repository: {missing}"


def test_every_underscored_name_in_prose_is_defined_in_the_code():
    code_words, prose = set(), {}
    for path in SOURCES:
        prose[path.name], words = prose_and_code(path)
        code_words |= words
    # parts of 2+ letters: not sum_d, z_s
    pattern = r"(?<![\w./-])([a-z][a-z0-9]*(?:_[a-z0-9]{2,})+)(?![\w/-]|\.\w)"
    unknown = sorted({f"{name}: {name_of_file}" for name_of_file, text in prose.items()
                      for name in re.findall(pattern, text)
                      if name not in code_words | OUTSIDE_NAMES})
    assert not unknown, ("docstrings/comments name functions or variables that do not exist: "
                         f"{unknown}")


def test_local_links_of_the_readme_and_docs_resolve():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_every_module_constant_is_used_and_every_url_written_once():
    texts = {path: path.read_text(encoding="utf-8") for path in SOURCES}
    everything = "\n".join(texts.values())
    unused, urls = [], {}
    for path in [path for path in SOURCES if path.parent.name != "tests"]:
        for node in ast.parse(texts[path]).body:
            names = [t.id for t in getattr(node, "targets", [])
                     if isinstance(t, ast.Name) and t.id.isupper()]
            unused += [f"{path.name}: {name}" for name in names
                       if len(re.findall(rf"\b{name}\b", everything)) < 2]
        for url in re.findall(r"https?://[^\s\"')]+", texts[path]):
            urls.setdefault(url.rstrip("/."), []).append(path.name)
    assert not unused, f"module-level constants that nothing uses: {unused}"
    repeated = {url: where for url, where in urls.items() if len(where) > 1}
    assert not repeated, f"URLs written more than once (define each once and import it): {repeated}"
