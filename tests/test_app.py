"""The web app in this process (the WSGI callable gunicorn serves, called directly): routing,
the one mapping of errors to HTTP, and what a click reads of its project.

``Services`` with the ``disk-test`` backbone, real SQLite stores in a temporary folder and a real
HTTP server standing in for Label Studio's files: fast enough for the inner loop
(``make test-fast``), the same code as the process.
"""

import json

import pytest

from backend_helpers import TOKEN, ImageServer, keypoint, predict_body, wsgi_call

ADMIN = {"HTTP_AUTHORIZATION": "Bearer adm"}


@pytest.fixture(scope="module")
def files(datasets):
    server = ImageServer({"penguin.jpg": (datasets / "GrabCut" / "img" / "106024.jpg").read_bytes()})
    yield server
    server.close()


def _services(data_dir, files):
    from backend.config import Settings
    from backend.server import App, Services

    sv = Services(Settings(backbone="disk-test", data_dir=data_dir, label_studio_url=files.url, label_studio_api_key=TOKEN,
                           admin_token="adm", request_timeout=30.0), load=False)
    sv.models.load()
    return sv, App(sv)


def _click(app, x, project="3.1"):
    status, r, _ = wsgi_call(app, "POST", "/predict",
                             json.dumps(predict_body("/data/upload/1/penguin.jpg", [keypoint(x, 50)], project=project)).encode())
    assert status == 200 and r["results"][0]["result"], r
    return r["results"][0]


def _last_click_calls(app):
    return wsgi_call(app, "GET", "/admin/health", headers=ADMIN)[1]["requests"]["database_calls_last_click"]


def test_a_cached_click_asks_the_database_once_and_sees_every_write_of_every_replica(tmp_path, files):
    """Two processes on one store (two replicas; here two ``Services`` on one data directory).
    A click on a project whose state is cached makes one database call (its generation); a
    reference set through the other replica, a project setting it confirmed and the annotators'
    decisions it recorded each move the generation, so the next click here answers with them."""
    a, app_a = _services(tmp_path / "data", files)
    b, app_b = _services(tmp_path / "data", files)
    try:
        first = _click(app_a, 40)
        assert first["mode"] == "pure-is"
        assert _click(app_a, 41)["model_version"] == first["model_version"]
        assert _last_click_calls(app_a) == 1  # the project's generation, nothing else
        # the other replica sets a reference: the next click here uses it, under a new model version
        s, r, _ = wsgi_call(app_b, "PUT", "/admin/references/3/Object", json.dumps({"text": "a bird"}).encode(), ADMIN)
        assert s == 200, r
        with_ref = _click(app_a, 42)
        assert with_ref["mode"] == "reference-text" and with_ref["model_version"] != first["model_version"]
        assert _click(app_a, 43)["mode"] == "reference-text" and _last_click_calls(app_a) == 1
        # the other replica confirms the project's extra params: the version names them here
        assert b.project_settings.set("3", {"chain_length": 1})
        chained = _click(app_a, 44)
        assert chained["model_version"].endswith("-chain1") and chained["settings"]["chain_length"] == 1
        # the annotators' decisions (learned thresholds) move it too
        before = a.versions.state("3").generation
        b.stats.on_decisions("3")
        assert a.versions.state("3").generation == before + 1
        assert _click(app_a, 45)["model_version"] == chained["model_version"] and _last_click_calls(app_a) == 1
    finally:
        a.close()
        b.close()


def test_each_domain_error_has_one_http_answer():
    """The web layer's one mapping: the domain's errors become their statuses; a bug becomes a 500
    with an id, its trace in the log, never its message."""
    from backend.errors import QueueFull, Refused, RequestError
    from backend.store.db import DatabaseUnavailable
    from backend.web.app import error_answer
    from backend.web.wsgi import HttpError, MethodNotAllowed

    assert error_answer(QueueFull("busy", 12.3))[:2] == (503, {"error": "busy", "expected_wait_s": 12.3})
    assert dict(error_answer(QueueFull("busy", 12.3))[3])["Retry-After"] == "13"
    assert error_answer(Refused("full"))[0] == error_answer(DatabaseUnavailable("away"))[0] == 503
    assert error_answer(RequestError("the field x"))[:2] == (400, {"error": "the field x"})
    assert dict(error_answer(MethodNotAllowed(["GET"], "no"))[3]) == {"Allow": "GET"}
    assert error_answer(HttpError(413, "big", reason="Too big"))[:3] == (413, {"error": "big"}, "Too big")
    status, body, _, _ = error_answer(KeyError("secret detail"))
    assert status == 500 and "secret detail" not in body["error"] and body["error"].startswith("internal error ")


def test_health_names_the_model_version_as_soon_as_the_weights_are_loaded(tmp_path, files):
    """The first health answer that says the weights are loaded also names the model version
    (CI once saw a replica answer ``model_version: None`` right after its start: the version was
    computed by the once-a-second monitor, after loading)."""
    sv, app = _services(tmp_path / "data", files)
    h = wsgi_call(app, "GET", "/admin/health", headers=ADMIN)[1]
    assert h["weights_loaded"] and h["model_version"] == sv.versions.base_version(), h


def _failing_once(fn):
    from backend.store.db import DatabaseUnavailable

    calls = []

    def wrapped(project):
        calls.append(project)
        if len(calls) == 1:
            raise DatabaseUnavailable("the database went away between the write and its bump")
        return fn(project)
    return wrapped


def test_a_write_whose_bump_failed_still_moves_the_generation_when_retried(tmp_path, files):
    """Settings and decisions are written in one transaction and the project's generation bumped
    in another (on SQLite another file). When the bump fails after the write committed, the work
    is retried; the retry finds the write already there and must still bump, or every process
    keeps the old settings (or threshold) cached (found by a reviewer)."""
    from backend.store.db import DatabaseUnavailable

    sv, _ = _services(tmp_path / "data", files)
    sv.project_settings.on_change = _failing_once(sv.store.bump)
    g0 = sv.store.generation("5")
    with pytest.raises(DatabaseUnavailable):
        sv.project_settings.set("5", {"chain_length": 1})
    assert sv.store.generation("5") == g0
    sv.project_settings.set("5", {"chain_length": 1})  # the confirmation, tried again
    assert sv.store.generation("5") > g0
    assert sv.versions.state("5").agent_settings.chain_length == 1
    # a deletion's retry finds no decision left to delete; the project its notice named moves
    sv.stats.on_decisions = _failing_once(sv.store.bump)
    g1 = sv.store.generation("5")
    with pytest.raises(DatabaseUnavailable):
        sv.stats.forget(77, "5")
    sv.stats.forget(77, "5")
    assert sv.store.generation("5") > g1


def test_a_threshold_the_database_did_not_give_is_not_cached(tmp_path, files, monkeypatch):
    """An "all like this" click while the statistics database fails answers with the default
    threshold, and the next click asks again instead of keeping that default for the generation."""
    from backend.store.db import DatabaseUnavailable

    sv, _ = _services(tmp_path / "data", files)
    state = sv.versions.state("5")
    real = sv.stats.calibrate

    def away(*a, **k):
        raise DatabaseUnavailable("statistics database away")

    monkeypatch.setattr(sv.stats, "calibrate", away)
    assert sv.versions.threshold(state, "Car")[1] == "default"
    assert ("Car", "mask") not in state.thresholds
    monkeypatch.setattr(sv.stats, "calibrate", real)
    assert sv.versions.threshold(state, "Car") == state.thresholds[("Car", "mask")]
