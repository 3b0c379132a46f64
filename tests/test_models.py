"""Registry, verified download and cache, against a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from smartsam import models
from smartsam.models import ModelError, ModelSpec


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint file: the small SAM architecture's random weights, saved by torch."""
    from smartsam.backbones.sam import build_sam_model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_tiny_test.pth"
    torch.save(build_sam_model("vit_tiny").state_dict(), path)
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}
    cut_after = {}  # path -> bytes to send before dropping the connection (once)
    requests = []
    token = None  # when set, files need "Authorization: Bearer <token>" (a gated hub repository)
    auth = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        data = self.files.get(self.path)
        self.requests.append((self.path, self.headers.get("Range")))
        self.auth.append(self.headers.get("Authorization"))
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            # what the hub answers for a gated repo: 401 without a token, 403 with one lacking access
            self.send_error(403 if self.headers.get("Authorization") else 401, "Access to model facebook/sam3 is restricted")
            return
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.cut_after.pop(self.path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    _Handler.files, _Handler.cut_after, _Handler.requests, _Handler.token, _Handler.auth = {}, {}, [], None, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()


def src() -> models.Sources:
    """What the CLI and the backend pass the library: the sources this process's environment names."""
    return models.Sources.from_environ(os.environ)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTSAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SMARTSAM_MIRROR", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path / "home"


def spec_for(path: Path, url: str, sha=True, size=True) -> ModelSpec:
    data = path.read_bytes()
    return ModelSpec("test-sam", "sam", "vit_tiny", "test", url=url, filename=path.name,
                     size=len(data) if size else None, sha256=hashlib.sha256(data).hexdigest() if sha else None)


def test_download_verifies_and_loads_into_the_real_architecture(server, checkpoint):
    base, h = server
    h.files["/ck.pth"] = checkpoint.read_bytes()
    spec = spec_for(checkpoint, base + "/ck.pth")
    path = models.download(spec, progress=False, sources=src())
    assert path.read_bytes() == checkpoint.read_bytes()
    assert models.is_downloaded(spec, sources=src())
    bb = models.load_backbone(spec, device="cpu", sources=src())
    ref = torch.load(checkpoint, weights_only=True)
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert torch.equal(bb.model.state_dict()[key].cpu(), ref[key])
    # a second call uses the verified cache: no new request
    n = len(h.requests)
    assert models.ensure_checkpoint(spec, sources=src()) == path and len(h.requests) == n


def test_interrupted_download_resumes(server, checkpoint):
    base, h = server
    data = checkpoint.read_bytes()
    h.files["/ck.pth"] = data
    h.cut_after["/ck.pth"] = len(data) // 3
    spec = spec_for(checkpoint, base + "/ck.pth")
    with pytest.raises(ModelError, match="run the same command again to resume"):
        models.download(spec, progress=False, sources=src())
    part = models.checkpoint_path(spec, sources=src()).with_name(checkpoint.name + ".part")
    assert 0 < part.stat().st_size < len(data)
    assert not models.checkpoint_path(spec, sources=src()).exists()  # nothing half-written is ever in place
    path = models.download(spec, progress=False, sources=src())
    assert path.read_bytes() == data
    assert h.requests[-1][1] == f"bytes={len(data) // 3}-"  # resumed, not restarted


def test_checksum_mismatch_is_refused_and_removed(server, checkpoint):
    base, h = server
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit, same size
    h.files["/ck.pth"] = bytes(data)
    spec = spec_for(checkpoint, base + "/ck.pth")
    with pytest.raises(ModelError, match="SHA-256"):
        models.download(spec, progress=False, sources=src())
    assert not models.checkpoint_path(spec, sources=src()).exists()
    assert not models.checkpoint_path(spec, sources=src()).with_name(checkpoint.name + ".part").exists()


def test_unpublished_hash_still_catches_truncation(server, checkpoint):
    base, h = server
    h.files["/ck.pth"] = checkpoint.read_bytes()[:-1000]
    spec = spec_for(checkpoint, base + "/ck.pth", sha=False, size=False)
    with pytest.raises(ModelError, match="not a complete checkpoint"):
        models.download(spec, progress=False, sources=src())


def test_hash_recorded_at_first_download_is_checked_from_then_on(server, checkpoint, tmp_path):
    base, h = server
    h.files["/ck.pth"] = checkpoint.read_bytes()
    spec = spec_for(checkpoint, base + "/ck.pth", sha=False, size=False)  # no published hash
    path = models.download(spec, progress=False, sources=src())
    # replaced by another complete archive: its CRCs pass, but it is not the file that was checked
    other = tmp_path / "other.pth"
    torch.save({"x": torch.ones(3)}, other)
    path.write_bytes(other.read_bytes())
    n = len(h.requests)
    assert models.ensure_checkpoint(spec, sources=src()) == path
    assert path.read_bytes() == checkpoint.read_bytes() and len(h.requests) == n + 1  # fetched again


def test_no_network_gives_one_clear_message(checkpoint):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    spec = spec_for(checkpoint, f"http://127.0.0.1:{port}/ck.pth")
    with pytest.raises(ModelError) as e:
        models.download(spec, progress=False, sources=src())
    msg = str(e.value)
    assert checkpoint.name in msg and spec.url in msg and "smartsam models download test-sam --from" in msg


def test_register_local_file(checkpoint):
    spec = spec_for(checkpoint, "http://127.0.0.1:9/unused")
    path = models.register_local(spec, checkpoint, sources=src())
    assert path.read_bytes() == checkpoint.read_bytes()
    bad = checkpoint.with_name("bad.pth")
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError):
        models.register_local(spec, bad, sources=src())


def test_registry_defaults_and_random_models_are_labelled(monkeypatch):
    monkeypatch.delenv("SMARTSAM_BACKBONE", raising=False)
    name = models.default_backbone()
    assert name == (models.DEFAULT_CUDA_BACKBONE if torch.cuda.is_available() else models.DEFAULT_CPU_BACKBONE)
    assert not models.get_spec(name).random
    monkeypatch.setenv("SMARTSAM_BACKBONE", "sam_vit_h")
    assert models.default_backbone() == name  # the library reads no setting; the CLI and backend map it
    for s in models.REGISTRY.values():
        assert s.random == (s.name.endswith("-random") or s.name.endswith("-test"))  # never real weights
        if not s.random and s.family in ("sam", "sam2"):
            assert s.url.startswith("https://dl.fbaipublicfiles.com/")
            assert s.sha256 and len(s.sha256) == 64  # every real checkpoint is checked against its published hash
    with pytest.raises(ModelError, match="unknown model"):
        models.get_spec("sam_vit_x")


def test_corrupt_local_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="expected 156008466"):  # SAM 2.1 files are checked like SAM's
        models.load_backbone("sam2.1_hiera_tiny", checkpoint=str(bad), device="cpu", sources=src())
    with pytest.raises(ModelError, match="could not load"):  # a checkpoint that is not one
        models.load_backbone(ModelSpec("test-sam", "sam", "vit_tiny", "test"), checkpoint=str(bad), device="cpu", sources=src())
    with pytest.raises(ModelError, match="does not exist"):
        models.load_backbone("sam2.1_hiera_tiny", checkpoint=str(tmp_path / "missing.pt"), device="cpu", sources=src())


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Real transformers-format folders (config.json + model.safetensors) of the small HQ-SAM and
    SAM 3 tracker designs, saved by save_pretrained as the hub repositories hold them."""
    from smartsam.backbones.hf_sam import build_sam3_models, build_sam_hq_model

    torch.manual_seed(2)
    out = {}
    for name, model in [("hq", build_sam_hq_model("vit_tiny")), ("sam3", build_sam3_models("tiny")[0])]:
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = d
    return out


def _serve_repo(h, repo: str, folder: Path) -> None:
    for f in ("config.json", "model.safetensors"):
        h.files[f"/{repo}/resolve/main/{f}"] = (folder / f).read_bytes()


def test_gated_sam3_without_access_names_the_license_page_and_hf_token(server, hf_folders, monkeypatch):
    """A local HTTP server stands in for the hub (HF_ENDPOINT, huggingface_hub's variable): 401
    without a token, 403 with one lacking access, the files with the right one."""
    base, h = server
    monkeypatch.setenv("HF_ENDPOINT", base)
    _serve_repo(h, "facebook/sam3", hf_folders["sam3"])
    h.token = "hf_right"
    spec = models.get_spec("sam3")
    with pytest.raises(ModelError) as e:
        models.download(spec, progress=False, sources=src())
    msg = str(e.value)
    assert "HTTP 401" in msg and "https://huggingface.co/facebook/sam3" in msg and "HF_TOKEN" in msg and "no HF_TOKEN" in msg
    assert "smartsam models download sam3 --from /path/to/folder" in msg and "Traceback" not in msg
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ModelError, match="HTTP 403.*has no access to it yet"):
        models.download(spec, progress=False, sources=src())
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    folder = models.download(spec, progress=False, sources=src())
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".json") or p.name == "config.json") == \
        ["config.json", "model.safetensors"]
    assert models.is_downloaded(spec, sources=src()) and "Bearer hf_right" in h.auth
    bb = models.load_backbone("sam3", device="cpu", sources=src())  # the downloaded folder, in the real architecture
    assert bb.grid == 288 and not bb.random_weights
    # the token goes to the hub only, never to another host (a mirror)
    h.auth.clear()
    monkeypatch.setenv("SMARTSAM_MIRROR", base)
    monkeypatch.delenv("HF_ENDPOINT")
    with pytest.raises(ModelError):
        models.download(models.get_spec("sam_hq_vit_b"), progress=False, sources=src())
    assert h.auth and all(a is None for a in h.auth)


def test_hq_sam_download_is_trusted_on_first_use_and_a_placed_folder_is_served(server, hf_folders, monkeypatch, tmp_path):
    base, h = server
    monkeypatch.setenv("HF_ENDPOINT", base)
    spec = models.get_spec("sam_hq_vit_b")
    good = (hf_folders["hq"] / "model.safetensors").read_bytes()
    _serve_repo(h, "syscv-community/sam-hq-vit-base", hf_folders["hq"])
    h.files["/syscv-community/sam-hq-vit-base/resolve/main/model.safetensors"] = good[:-100]  # truncated in transit
    with pytest.raises(ModelError, match="not a complete safetensors file"):
        models.download(spec, progress=False, sources=src())
    assert not models.is_downloaded(spec, sources=src())
    h.files["/syscv-community/sam-hq-vit-base/resolve/main/model.safetensors"] = good
    folder = models.download(spec, progress=False, sources=src())
    bb = models.load_backbone("sam_hq_vit_b", device="cpu", sources=src())
    key = "mask_decoder.iou_prediction_head.proj_in.weight"
    from safetensors.torch import load_file

    assert torch.equal(bb.model.state_dict()[key].cpu(), load_file(hf_folders["hq"] / "model.safetensors")[key])
    # the hash of that first verified download is checked from then on
    f = folder / "model.safetensors"
    st = f.stat()
    bad = bytearray(good)
    bad[-1000] ^= 0xFF  # one flipped byte inside a tensor: the header still adds up
    f.write_bytes(bytes(bad))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # a later write, even on a coarse clock
    h.files.clear()
    with pytest.raises(ModelError):
        models.ensure_checkpoint(spec, sources=src())
    # an offline machine: `smartsam models download NAME --from FOLDER`
    from smartsam.cli import main

    assert main(["models", "download", "sam_hq_vit_l", "--from", str(hf_folders["hq"])]) == 0
    assert models.is_downloaded(models.get_spec("sam_hq_vit_l"), sources=src())
    assert models.load_backbone("sam_hq_vit_l", device="cpu", sources=src()).grid == 256
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="lacks config.json, model.safetensors"):
        models.register_local(models.get_spec("sam_hq_vit_h"), empty, sources=src())
