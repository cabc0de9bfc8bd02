"""The shape of the code: the root shows the design card (the reading path, the study, one
package of side modules, one folder of configs), imports run one way (no cycle), the reading path
stays short enough to read in one sitting, no Python line is over 100 columns, and vkd/metrics.py
needs nothing beyond numpy."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT_FILES = ("model.py", "data.py", "train.py", "evaluate.py", "study.py")
PACKAGE, CONFIG = "vkd", "config"
# the files a student reads in order: together at most MAX_READING_LINES, no function over
# MAX_FUNCTION_LINES
READING_PATH = ("model.py", "data.py", "train.py", "evaluate.py")
MAX_READING_LINES = 1300
MAX_FUNCTION_LINES = 50
MAX_COLUMNS = 100


def module_name(path):
    """The import name of a file: `train`, `vkd.batching`, `config.presets`."""
    relative = path.relative_to(REPO).with_suffix("")
    return ".".join(relative.parts)


def project_modules():
    """{import name: path} of every module: the root files, the package and the configs."""
    paths = [*REPO.glob("*.py"), *(REPO / PACKAGE).glob("*.py"), *(REPO / CONFIG).glob("*.py")]
    return {module_name(path): path for path in sorted(paths)}


def imported_modules(path):
    """Every module `path` imports, at the top or inside a function, by its full name; for
    `from vkd import batching` both `vkd` and `vkd.batching`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def import_graph():
    """{module: the project's modules it imports} (the package's __init__ is left out: it only
    makes the folder importable)."""
    modules = set(project_modules()) - {f"{PACKAGE}.__init__"}
    return {name: (imported_modules(path) & modules) - {name}
            for name, path in project_modules().items() if name in modules}


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[name] = "done"
        stack.pop()
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_root_shows_the_design_card():
    assert sorted(path.name for path in REPO.glob("*.py")) == sorted(ROOT_FILES)
    package = REPO / PACKAGE
    assert [path for path in package.iterdir() if path.is_dir() and path.name != "__pycache__"] \
        == [], "the package is flat"
    init = ast.parse((package / "__init__.py").read_text(encoding="utf-8"))
    assert all(isinstance(node, ast.Expr) for node in init.body), "__init__.py only a docstring"


def test_no_import_cycle_among_all_modules():
    graph = import_graph()
    assert {"data", "evaluate", "vkd.metrics", "model", "train", "vkd.runtime"} <= graph.keys()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_import_graph_follows_the_package():
    graph = import_graph()
    assert "vkd.batching" in graph["train"] and "vkd.text_tuning" in graph["model"]


def test_only_the_entry_points_import_evaluate_and_only_the_study_imports_train():
    graph = import_graph()
    importers = sorted(name for name, imports in graph.items() if "evaluate" in imports)
    assert importers == ["study", "train", "vkd.recipe"]
    assert [name for name, imports in graph.items() if "train" in imports] == ["study"]


def function_lengths(path):
    """{qualified name: lines from its first decorator to its last line} of every function."""
    lengths = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    lengths[name] = child.end_lineno - start + 1
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(encoding="utf-8")), "")
    return lengths


def test_the_reading_path_is_short():
    lines = {name: len((REPO / name).read_text(encoding="utf-8").splitlines())
             for name in READING_PATH}
    assert sum(lines.values()) <= MAX_READING_LINES, f"the reading path has {lines} lines"


@pytest.mark.parametrize("name", READING_PATH)
def test_reading_path_functions_are_short(name):
    lengths = function_lengths(REPO / name)
    long = {function: n for function, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions in {name} over {MAX_FUNCTION_LINES} lines: {long}"


def test_function_lengths_count_decorators_and_nested_functions(tmp_path):
    path = tmp_path / "example.py"
    path.write_text("@decorator\ndef outer():\n    def inner():\n        return 1\n"
                    "    return inner\n")
    assert function_lengths(path) == {"outer": 5, "outer.inner": 2}


def test_no_python_line_is_over_100_columns():
    paths = [*project_modules().values(), *sorted((REPO / "tests").glob("*.py"))]
    long = [f"{path.relative_to(REPO)}:{i}" for path in paths
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > MAX_COLUMNS]
    assert not long, f"lines over {MAX_COLUMNS} columns: {long[:20]} ({len(long)} in all)"


def test_metrics_imports_numpy_and_the_standard_library_only():
    allowed = {"numpy"} | set(sys.stdlib_module_names)
    imported = {name.split(".")[0] for name in imported_modules(REPO / "vkd" / "metrics.py")}
    assert imported - allowed == set()
