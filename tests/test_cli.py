import json

import numpy as np
import pytest
from PIL import Image

from cli_helpers import run_cli

IMG = "GrabCut/img/106024.jpg"


def test_segment_writes_mask_and_overlay(datasets, tmp_path):
    out, ov = tmp_path / "m.png", tmp_path / "o.png"
    p = run_cli("segment", str(datasets / IMG), "--click", "240,160", "--negative", "20,20", "--out", str(out),
                "--overlay", str(ov), "--backbone", "sam2.1_hiera_tiny-random", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["mode"] == "refine" and info["random_weights"] is True
    assert "RANDOM weights" in p.stderr
    m = np.asarray(Image.open(out))
    assert m.shape == (321, 481) and set(np.unique(m)) <= {0, 255} and (m == 255).sum() == info["area"]
    assert Image.open(ov).size == (481, 321)


def test_segment_with_references(datasets, tmp_path):
    ref_img = datasets / "COCO_MVal-dev/img/airplane00_000000281693.jpg"
    ref_mask = datasets / "COCO_MVal-dev/gt/airplane00_000000281693.png"
    p = run_cli("segment", str(datasets / IMG), "--click", "240,160", "--reference-image", str(ref_img),
                "--reference-mask", str(ref_mask), "--out", str(tmp_path / "m.png"), "--backbone", "sam_vit_tiny-random", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.strip().splitlines()[-1])
    # auto on a CPU: the literal path with bf16 hardware (and the shared decoder), else the fast
    # path; the output says which
    from smartsam.backbones.base import cpu_has_fast_bf16

    path = "literal" if cpu_has_fast_bf16() else "fast"
    assert info["mode"] == "reference-mask" and info["path"] == path and info["require_click"] is True
    # the same two settings as the backend and eval: flags, else SMARTSAM_FAST_PATH / SMARTSAM_REQUIRE_CLICK
    p = run_cli("segment", str(datasets / IMG), "--click", "240,160", "--out", str(tmp_path / "m.png"), "--backbone", "disk-test",
                "--json", "--fast-path", "off", "--allow-anywhere")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["path"] == "literal" and info["require_click"] is False, info
    p = run_cli("segment", str(datasets / IMG), "--click", "240,160", "--out", str(tmp_path / "m.png"), "--backbone",
                "disk-test", "--json", env={"SMARTSAM_FAST_PATH": "off", "SMARTSAM_REQUIRE_CLICK": "false"}, timeout=120)
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["path"] == "literal" and info["require_click"] is False, info
    p = run_cli("segment", str(datasets / IMG), "--click", "240,160", "--reference-text", "penguin",
                "--out", str(tmp_path / "m.png"), "--backbone", "sam_vit_tiny-random", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["mode"] == "reference-text"


@pytest.mark.parametrize(
    "args, message",
    [
        (["{img}", "--click", "2400,10"], "outside the 481x321 image"),
        (["{img}", "--click", "nan,10"], "not a finite point"),
        (["{tmp}/missing.jpg", "--click", "1,1"], "not found"),
        (["{tmp}/notimage.jpg", "--click", "1,1"], "cannot read"),
        (["{img}", "--click", "1;1"], "expected X,Y"),
        (["{img}", "--click", "10,10", "--reference-mask", "{img}"], "--reference-mask needs --reference-image"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(datasets, tmp_path, args, message):
    (tmp_path / "notimage.jpg").write_text("hello")
    args = [a.format(img=datasets / IMG, tmp=tmp_path) for a in args]
    p = run_cli("segment", *args, "--out", str(tmp_path / "m.png"), "--backbone", "sam2.1_hiera_tiny-random")
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_unloadable_checkpoint_is_one_line_with_exit_code_1(datasets, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    for backbone, message in [("sam2.1_hiera_tiny", "expected 156008466"), ("sam2.1_hiera_tiny-random", "random weights")]:
        p = run_cli("segment", str(datasets / IMG), "--click", "10,10", "--checkpoint", str(bad), "--backbone", backbone,
                    "--out", str(tmp_path / "m.png"))
        assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr


def test_models_list_and_help():
    p = run_cli("models", "list")
    assert p.returncode == 0
    for name in ["sam_vit_h", "sam2.1_hiera_tiny", "sam2.1_hiera_large", "dinov2-base", "clip-base", "sam2.1_hiera_tiny-random"]:
        assert name in p.stdout
    p = run_cli("segment", "--help")
    assert p.returncode == 0 and "--reference-text" in p.stdout and "x = column" in p.stdout


def test_explain_figure(datasets, tmp_path):
    out = tmp_path / "fig.png"
    p = run_cli("explain", str(datasets / IMG), "--click", "240,160", "--out", str(out), "--backbone", "sam_vit_tiny-random")
    assert p.returncode == 0, p.stderr
    assert Image.open(out).size[0] > 500
