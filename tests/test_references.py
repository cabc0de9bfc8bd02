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


PROJECT_MODULES = [path for path in SOURCES if path.parent.name != "tests"]
# names from elsewhere that the docs give in backticks: a launcher and a Kubernetes setting
OUTSIDE_DOC_NAMES = {"srun", "terminationGracePeriodSeconds"}
EXTERNAL_MODULES = {"torch", "nn", "F", "np", "dist", "torchvision", "tokenizers", "sklearn"}
FILE_ENDINGS = (".py", ".md", ".json", ".jsonl", ".png", ".pt", ".xml", ".csv", ".tgz", ".npy",
                ".txt", ".ipynb", ".toml", ".jpg")


def resolve(obj, attributes):
    """Whether obj.a.b... exists; a dataclass field counts as an attribute of its class."""
    for attribute in attributes:
        fields = getattr(obj, "__dataclass_fields__", {})
        if attribute in fields:
            return attribute == attributes[-1]
        if not hasattr(obj, attribute):
            return False
        obj = getattr(obj, attribute)
    return True


def test_every_name_the_docs_give_exists():
    """A name in backticks in the README or docs/ (`runtime.RunLog`, `VKD.predict`,
    `show_summary`) must exist: an attribute of the project's module where it starts with one, of
    the class or function where it starts with one of theirs, and else a word of the code. A
    renamed function cannot leave the tour pointing at its old name."""
    import importlib
    modules = {path.stem: importlib.import_module(module_name(path))
               for path in PROJECT_MODULES if path.stem != "__init__"}
    top_level = {name: getattr(module, name) for module in modules.values()
                 for name in dir(module) if not name.startswith("_")}
    code_words = set()                  # this file's own text would vouch for what it names
    for path in [path for path in SOURCES if path.name != Path(__file__).name]:
        code_words |= set(re.findall(r"\w+", path.read_text(encoding="utf-8")))
    stale = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for span in re.findall(r"`([^`\n]+)`", page.read_text(encoding="utf-8")):
            if (not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", span)
                    or span.endswith(FILE_ENDINGS) or span in OUTSIDE_DOC_NAMES):
                continue
            first, *rest = span.split(".")
            if first in EXTERNAL_MODULES:
                continue
            if first in modules:
                found = resolve(modules[first], rest)
            elif first in top_level and rest:
                found = resolve(top_level[first], rest)
            else:
                found = all(part in code_words for part in span.split("."))
            if not found:
                stale.append(f"{page.name}: {span}")
    assert not stale, f"names in backticks that the code does not have: {stale}"


def module_name(path):
    relative = path.relative_to(REPO).with_suffix("")
    return ".".join(relative.parts)
