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


# The backend's floors, top to bottom: a module imports only from its own floor or those below
# (README, "Development"). The folders are the floors; the three top-level modules sit where named.
FLOORS = ["cli", "server", "web", "background", "serving", "store", "labelstudio", "config", "errors"]


def _floor(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return {"gunicorn_conf": "server", "": "errors"}.get(part, part)


def test_the_backend_imports_point_down_its_floors():
    graph = _imports(_modules())
    backend = {m: ts for m, ts in graph.items() if m.startswith("backend.")}
    assert {_floor(m) for m in backend} <= set(FLOORS), sorted({_floor(m) for m in backend} - set(FLOORS))
    up = sorted((m, t) for m, ts in backend.items() for t in ts
                if t.startswith("backend.") and FLOORS.index(_floor(t)) < FLOORS.index(_floor(m)))
    assert not up, f"imports that point up a floor: {up}"
    # nothing below the web layer knows HTTP: the HTTP error and the routing live in backend.web
    below = [m for m in backend if FLOORS.index(_floor(m)) > FLOORS.index("web")]
    assert not [m for m in below if "HttpError" in _modules()[m].read_text()], "HTTP below the web layer"


def test_the_algorithm_never_imports_label_studio():
    graph = _imports(_modules())
    assert not [(m, t) for m, ts in graph.items() if m.startswith("smartsam") for t in ts if t.startswith("backend")]
    for f in (ROOT / "smartsam").rglob("*.py"):
        text = f.read_text()
        assert "label_studio" not in text.replace("label_studio_url", ""), f


def _reads_environment(f: Path) -> list:
    """Lines of ``f`` that read the process environment (os.environ, os.getenv)."""
    hits = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "getenv", "environb"):
            hits.append(node.lineno)
    return hits


def test_the_library_reads_no_environment():
    """Only the command line (``cli_common``, the CLIs' one reader) reads the environment in
    ``smartsam``; every knob reaches the library as an argument (checkpoint sources included)."""
    readers = {str(f.relative_to(ROOT)): _reads_environment(f) for f in (ROOT / "smartsam").rglob("*.py")}
    assert readers["smartsam/cli_common.py"]  # the checker sees a reader where there is one
    assert {f: lines for f, lines in readers.items() if lines and f != "smartsam/cli_common.py"} == {}


def test_checkpoint_sources_come_from_the_settings_not_the_environment(monkeypatch, tmp_path):
    from backend.config import Settings
    from smartsam.sources import Sources

    env = {"SMARTSAM_HOME": str(tmp_path / "h"), "SMARTSAM_MIRROR": "http://mirror.example", "HF_TOKEN": "hf_secret"}
    s = Settings.from_env(env)
    assert s.sources == Sources(tmp_path / "h", "http://mirror.example", None, "hf_secret")
    assert s.backbone_kwargs()["sources"] is s.sources
    assert "hf_secret" not in repr(s)  # a token never reaches a log line that prints the settings
    # the library takes what it is given, whatever this process's environment says
    monkeypatch.setenv("SMARTSAM_HOME", str(tmp_path / "elsewhere"))
    from smartsam import models

    spec = models.get_spec("sam2.1_hiera_tiny")
    assert models.checkpoint_path(spec, s.sources).is_relative_to(tmp_path / "h")
    assert models.checkpoint_path(spec, Sources.from_environ({"XDG_CACHE_HOME": str(tmp_path / "x")})).is_relative_to(
        tmp_path / "x" / "smartsam")


def test_the_stores_and_the_admin_commands_load_no_torch():
    """The stores (and so `python -m backend.cli.references list/show/history/...`) import no
    torch: an admin's command answers in about half a second here instead of 2.5 s, and the
    suite runs many of them. Checked in a fresh interpreter, as the command runs."""
    import subprocess
    import sys

    code = ("import sys\nimport backend.store.references, backend.store.field_stats, backend.store.work_queue, "
            "backend.cli.references\nprint(sorted(m for m in ('torch', 'transformers', 'sam2') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout
