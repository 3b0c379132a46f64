import os
import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SMARTSAM_DATASETS", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets() -> Path:
    if not (DATASETS / "GrabCut").is_dir():
        pytest.fail(f"benchmark data not found at {DATASETS} (set SMARTSAM_DATASETS)")
    return DATASETS


@pytest.fixture(scope="session")
def grabcut_image(datasets):
    from smartsam.io import load_image

    return load_image(datasets / "GrabCut" / "img" / "106024.jpg")


@pytest.fixture(scope="session")
def coco_image(datasets):
    from smartsam.io import load_image

    return load_image(datasets / "COCO_MVal-dev" / "img" / "airplane00_000000281693.jpg")


@pytest.fixture(scope="session")
def sam2_backbone():
    from smartsam.models import load_backbone

    return load_backbone("sam2.1_hiera_tiny-random", device="cpu")


@pytest.fixture(scope="session")
def sam_backbone():
    from smartsam.models import load_backbone

    return load_backbone("sam_vit_tiny-random", device="cpu")


@pytest.fixture(scope="session")
def dino():
    from smartsam.models import load_features

    return load_features("dinov2-tiny-random", device="cpu")


@pytest.fixture(scope="session")
def clip():
    from smartsam.models import load_features

    return load_features("clip-tiny-random", device="cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL cluster for the session (tests/servers.py)."""
    from servers import PostgresServer

    server = PostgresServer().start()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    """The store's database: None (the embedded SQLite files) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory, datasets):
    """One real Label Studio 1.23.2 for the whole run (tests/ls_helpers.py): every test makes
    its own projects in it."""
    from ls_helpers import LabelStudio

    ls = LabelStudio(tmp_path_factory.mktemp("ls"), datasets)
    ls.documents = datasets
    yield ls
    ls.stop()


# -- which tests start real processes ---------------------------------------------------------
# `make test-fast` runs the rest (the app in this process, real SQLite, real files); `make test`
# and CI run everything. A test is marked by what it does: a fixture that starts a server, or
# code that starts one (the backend launched as the README does, Label Studio, Chromium,
# PostgreSQL, nginx, Ray, the CLIs as subprocesses).
PROCESS_FIXTURES = {"label_studio", "backend", "disk_backend", "pg_server", "drip_server", "proxy"}
PROCESS_CODE = ("Backend(", "subprocess", "run_cli(", "sync_playwright", "ray.init", "ray.remote", "unshare", "_admin(",
                "_writer(", "Nginx(", "_weed(")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        try:
            src = inspect.getsource(item.function)
        except (OSError, TypeError):
            src = ""
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (set(item.fixturenames) & PROCESS_FIXTURES or any(p in src for p in PROCESS_CODE)
                or params.get("database_url") == "postgresql"):
            item.add_marker(pytest.mark.processes)
