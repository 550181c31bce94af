"""The package's modules import each other without a circle (imports inside functions count too), so each
module can be read, tested and replaced from the bottom up; and each stays small enough to read in one sitting
(at most 350 lines a module, 60 a function). `python tests/test_import_graph.py` prints the
modules by layer (README's import graph): a module imports only modules of lower layers."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dotmoe"


def import_graph() -> dict[str, set[str]]:
    """module -> the dotmoe modules it imports anywhere in its file."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dotmoe"):
                parts = node.module.split(".")
                if len(parts) > 1 and parts[1] in modules:
                    found.add(parts[1])
                elif len(parts) == 1:  # from dotmoe import x
                    found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names
                          if a.name.startswith("dotmoe.") and a.name.split(".")[1] in modules}
        graph[path.stem] = found - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_graph()["convert"] >= {"train", "layerwise", "prune"}


def test_no_import_circle():
    assert cycles(import_graph()) == []


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 60


def oversized(package: Path = PACKAGE) -> list[str]:
    """Modules over MAX_MODULE_LINES lines and functions (methods and nested ones too) over MAX_FUNCTION_LINES."""
    found = []
    for path in sorted(package.glob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_the_size_check_sees_a_long_function(tmp_path):
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\n\ndef g():\n    pass\n")
    assert oversized(tmp_path) == [f"long.py:1 f: {MAX_FUNCTION_LINES + 1} lines"]


def test_no_module_or_function_too_long():
    assert oversized() == []


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules by layer: layer 0 imports no dotmoe module, layer n only modules of layers below n."""
    level: dict[str, int] = {}

    def depth(v):
        if v not in level:
            level[v] = 1 + max((depth(w) for w in graph[v]), default=-1)
        return level[v]

    for v in graph:
        depth(v)
    return [sorted(v for v in graph if level[v] == n) for n in range(max(level.values()) + 1)]


if __name__ == "__main__":
    for n, mods in enumerate(layers(import_graph())):
        print(f"{n}: {' '.join(mods)}")
