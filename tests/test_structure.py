"""The shape of the code: imports run one way (leaf modules first, no cycle), the reading path stays short
enough to read in one sitting, and metrics.py needs nothing beyond numpy."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in sorted(REPO.glob("*.py"))}
# the files a student reads in order; each under MAX_LINES, no function in it over MAX_FUNCTION_LINES
READING_PATH = ("model.py", "data.py", "train.py", "evaluate.py", "metrics.py")
MAX_LINES = 400
MAX_FUNCTION_LINES = 60


def imported_modules(path):
    """Every module `path` imports, at the top or inside a function, as the top-level package name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph():
    """{module: the repository's modules it imports}, over the repository's top-level .py files."""
    return {name: imported_modules(path) & MODULES.keys() - {name} for name, path in MODULES.items()}


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


def test_no_import_cycle_among_the_modules():
    graph = import_graph()
    assert {"data", "evaluate", "metrics", "model", "train"} <= graph.keys()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_only_the_training_entry_points_import_evaluate_and_nothing_imports_train():
    graph = import_graph()
    assert sorted(name for name, imports in graph.items() if "evaluate" in imports) == ["recipe", "study", "train"]
    assert [name for name, imports in graph.items() if "train" in imports] == []


def function_lengths(path):
    """{qualified name: lines from its first decorator to its last line} of every function in a file."""
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


@pytest.mark.parametrize("name", READING_PATH)
def test_reading_path_files_are_short_and_so_are_their_functions(name):
    path = REPO / name
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines < MAX_LINES, f"{name} has {lines} lines; the reading path keeps each file under {MAX_LINES}"
    long = {function: n for function, n in function_lengths(path).items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions in {name} over {MAX_FUNCTION_LINES} lines: {long}"


def test_function_lengths_count_decorators_and_nested_functions(tmp_path):
    path = tmp_path / "example.py"
    path.write_text("@decorator\ndef outer():\n    def inner():\n        return 1\n    return inner\n")
    assert function_lengths(path) == {"outer": 5, "outer.inner": 2}


def test_metrics_imports_numpy_and_the_standard_library_only():
    allowed = {"numpy"} | set(sys.stdlib_module_names)
    assert imported_modules(MODULES["metrics"]) - allowed == set()
