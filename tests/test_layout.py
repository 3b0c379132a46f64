"""The code's layout as the README states it: no import circles among the project's modules, and
the algorithm (``smartsam``) never imports the Label Studio side."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules():
    mods = {}
    for pkg in ("smartsam", "backend"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(mods):
    """Module -> the project modules it imports anywhere in its code (functions included)."""
    graph = {}
    for name, f in mods.items():
        pkg = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[:len(pkg) - node.level + 1] + [node.module] if node.module else
                                pkg[:len(pkg) - node.level + 1]) if node.level else node.module or ""
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.add(t)
        graph[name] = out
    return graph


def test_no_import_circles():
    graph = _imports(_modules())
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_algorithm_never_imports_label_studio():
    graph = _imports(_modules())
    assert not [(m, t) for m, ts in graph.items() if m.startswith("smartsam") for t in ts if t.startswith("backend")]
    for f in (ROOT / "smartsam").rglob("*.py"):
        text = f.read_text()
        assert "label_studio" not in text.replace("label_studio_url", ""), f
