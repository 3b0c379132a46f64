"""Known answers for the evaluation harness: it is trusted because of these."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_cli
from smartsam.eval.clicker import Clicker
from smartsam.eval.datasets import Sample, category_of, load_dataset, load_gt, reference_for
from smartsam.eval.metrics import mask_iou, noc, summarize
from smartsam.eval.runner import evaluate, run_sample
from smartsam.eval.segmenters import Segmenter


def square_gt():
    gt = np.zeros((21, 21), bool)
    gt[5:16, 5:16] = True  # 11 x 11
    return gt


class Scripted(Segmenter):
    """Returns the given masks in order, whatever the clicks; records the clicks it saw."""

    name = "scripted"

    def __init__(self, script):
        self.script = script

    def start(self, image, sample):
        self.masks = list(self.script[sample.name])
        self.seen = []

    def click(self, points_xy, labels):
        self.seen.append((points_xy.copy(), labels.copy()))
        m = self.masks.pop(0) if self.masks else self.last
        self.last = m
        cands = np.stack([m, square_gt()]) if len(self.seen) == 1 and m.any() else (m[None] if len(self.seen) == 1 else None)
        return m, cands


def hand_made_script():
    gt = square_gt()
    left = np.zeros_like(gt)
    left[5:16, 5:11] = True            # 66 px: IoU 66/121
    plus = gt.copy()
    plus[5:16, 16] = True              # 11 false-positive px: IoU 121/132
    return {"a": [left, plus, gt.copy()], "b": [np.zeros_like(gt)]}


def test_clicks_and_ious_worked_out_by_hand(tmp_path):
    gt = square_gt()
    seg = Scripted(hand_made_script())
    r = run_sample(seg, np.zeros((21, 21, 3), np.uint8), gt, None, Sample("a", Path("a"), Path("a"), ""), max_clicks=5)
    # click 1: the middle of the square; click 2: middle of the missed 11x5 strip (distance 3,
    # first in row-major order); click 3: negative on the 1-px false-positive column.
    assert r["clicks"] == [(10, 10, 1), (13, 7, 1), (16, 5, 0)]
    assert r["ious"] == pytest.approx([66 / 121, 121 / 132, 1.0])  # stops at 1.0: nothing to click
    assert r["iou_best"] == pytest.approx(1.0)
    pts, labels = seg.seen[-1]
    assert pts.tolist() == [[10, 10], [13, 7], [16, 5]] and labels.tolist() == [1, 1, 0]


def test_every_metric_worked_out_by_hand():
    a = [66 / 121, 121 / 132, 1.0]
    b = [0.0] * 5
    m = summarize([a, b], max_clicks=5, iou_best=[1.0, 0.0])
    assert m["mIoU@1"] == pytest.approx(100 * (66 / 121) / 2)
    assert m["Ratio@75"] == 0 and m["Ratio@85"] == 0
    assert m["NoC@75"] == pytest.approx((2 + 5) / 2)
    assert m["NoC@85"] == pytest.approx((2 + 5) / 2)
    assert m["NoC@90"] == pytest.approx((2 + 5) / 2)
    assert m["IoU_best"] == pytest.approx(50.0)
    assert m["miou_per_click"] == pytest.approx([100 * 66 / 121 / 2, 100 * 121 / 132 / 2, 50, 50, 50])
    assert noc([0.5, 0.95], 0.9, 20) == 2 and noc([0.5], 0.9, 20) == 20 and noc([0.95], 0.9, 20) == 1


def test_thresholds_separate_and_ratios_count():
    """A sample at 0.80 / 0.87 / 0.92 crosses 75 at click 1, 85 at click 2 and 90 at click 3: every
    threshold is told apart, and Ratio@75 counts it while Ratio@85 does not."""
    c = [0.80, 0.87, 0.92]
    d = [0.90, 0.95]
    m = summarize([c, d], max_clicks=4, iou_best=[0.8, 0.3])
    assert m["Ratio@75"] == pytest.approx(100.0) and m["Ratio@85"] == pytest.approx(50.0)
    assert m["NoC@75"] == pytest.approx(1.0)
    assert m["NoC@85"] == pytest.approx((2 + 1) / 2)
    assert m["NoC@90"] == pytest.approx((3 + 1) / 2)
    assert m["IoU_best"] == pytest.approx(55.0)
    assert m["mIoU@1"] == pytest.approx(85.0)
    # a sample that stopped early keeps its last IoU in the per-click curve
    assert m["miou_per_click"] == pytest.approx([85.0, 91.0, 93.5, 93.5])


def test_ignore_band_counts_for_nothing():
    gt = square_gt()
    ignore = np.zeros_like(gt)
    ignore[:, 16] = True
    pred = gt.copy()
    pred[5:16, 16] = True
    assert mask_iou(pred, gt) < 1.0
    assert mask_iou(pred, gt, ignore) == 1.0
    # and the clicker never clicks in it
    c = Clicker(gt, ignore)
    c.make_next_click(np.zeros_like(gt))
    click = c.make_next_click(pred)
    assert not ignore[click.coords]


def test_grabcut_ground_truth_has_an_ignore_band(datasets):
    samples = load_dataset(datasets / "GrabCut")
    assert len(samples) == 50
    bands = [load_gt(s) for s in samples]
    with_band = [(gt, ig) for gt, ig in bands if ig is not None]
    assert 0 < len(with_band) < 50  # some masks have the 128 band (124080 does), some do not
    assert all(not (gt & ig).any() for gt, ig in with_band)
    gt, ignore = load_gt(next(s for s in samples if s.name == "124080"))
    assert ignore.sum() == 2503


def test_coco_categories_and_deterministic_references(datasets):
    assert category_of("airplane00_000000281693") == "airplane"
    assert category_of("baseball bat03_000000012345") == "baseball bat"
    samples = load_dataset(datasets / "COCO_MVal-dev")
    assert len(samples) == 408
    s = samples[0]
    r = reference_for(s, samples)
    assert r.category == s.category and r.name != s.name
    assert r.name.rsplit("_", 1)[1] != s.name.rsplit("_", 1)[1]  # another image
    assert reference_for(s, samples) == r


@pytest.mark.parametrize("dataset", ["GrabCut", "COCO_MVal-dev"])
def test_oracle_and_empty_through_the_cli(datasets, tmp_path, dataset):
    for mode, miou, nocs in [("oracle", 100.0, 1.0), ("empty", 0.0, 7.0)]:
        p = run_cli("eval", "--dataset", str(datasets / dataset), "--mode", mode, "--limit", "4", "--max-clicks", "7",
                    "--out", str(tmp_path), "--no-progress")
        assert p.returncode == 0, p.stderr
        s = json.loads((tmp_path / f"{mode}.json").read_text())
        assert s["n"] == 4 and s["mIoU@1"] == miou and s["NoC@90"] == nocs and s["NoC@85"] == nocs
    assert (tmp_path / "miou_vs_clicks.png").stat().st_size > 1000
    assert len((tmp_path / "oracle.csv").read_text().splitlines()) == 1 + 4 * 5  # 5 trials by default


def test_runs_resume_where_they_stopped(datasets, tmp_path):
    samples = load_dataset(datasets / "GrabCut")[:4]
    starts = []

    class Counting(Scripted):
        def start(self, image, sample):
            starts.append(sample.name)
            self.masks, self.seen = [np.zeros(image.shape[:2], bool)], []

    evaluate(samples[:2], lambda t: Counting({}), tmp_path, "x", "GrabCut", max_clicks=2, progress=False)
    s = evaluate(samples, lambda t: Counting({}), tmp_path, "x", "GrabCut", max_clicks=2, progress=False)
    assert starts == [x.name for x in samples[:2]] + [x.name for x in samples[2:]]
    assert s["n"] == 4


def test_backbone_and_agent_modes_run_end_to_end(datasets, tmp_path):
    from smartsam.backbones.base import cpu_has_fast_bf16

    # real architectures with random weights: checks the plumbing, labels the output
    for mode, ds in [("backbone", "GrabCut"), ("pure-is", "GrabCut"), ("reference", "COCO_MVal-dev")]:
        p = run_cli("eval", "--dataset", str(datasets / ds), "--mode", mode, "--limit", "1", "--max-clicks", "2",
                    "--backbone", "sam_vit_tiny-random", "--out", str(tmp_path / ds), "--no-progress", "--trials", "1")
        assert p.returncode == 0, p.stderr
        s = json.loads((tmp_path / ds / f"{mode}.json").read_text())
        assert s["random_weights"] is True and "RANDOM" in s["note"] and "RANDOM weights" in p.stdout
        # the summary is the metrics of the per-sample rows it wrote (CSV), not another computation
        rows = [r for r in csv.DictReader((tmp_path / ds / f"{mode}.csv").open())]
        assert len(rows) == s["n"] == 1 and s["seeds"] == [0]
        if mode != "backbone":
            # auto on a CPU: literal with bf16 hardware (SAM's shared decoder), else the fast
            # path; and the click restriction
            assert s["path"] == ("literal" if cpu_has_fast_bf16() else "fast") and s["require_click"] is True
        ious = [[float(v) for v in r["ious"].split()] for r in rows]
        assert s["NoC@90"] == pytest.approx(np.mean([noc(i, 0.9, 2) for i in ious]))
        assert s["mIoU@1"] == pytest.approx(100 * np.mean([i[0] for i in ious]))
    p = run_cli("eval", "--dataset", str(datasets / "GrabCut"), "--mode", "reference", "--limit", "1",
                "--backbone", "sam_vit_tiny-random", "--out", str(tmp_path / "g"), "--no-progress")
    assert p.returncode == 2 and "categories" in p.stderr


def test_trials_and_seed(datasets, tmp_path):
    args = ["eval", "--dataset", str(datasets / "GrabCut"), "--mode", "pure-is", "--limit", "1", "--max-clicks", "2",
            "--backbone", "disk-test", "--no-progress"]
    p = run_cli(*args, "--out", str(tmp_path / "a"), "--seed", "7", "--trials", "2")
    assert p.returncode == 0, p.stderr
    s = json.loads((tmp_path / "a" / "pure-is.json").read_text())
    assert s["trials"] == 2 and s["seed"] == 7 and s["seeds"] == [7, 8]
    rows = list(csv.DictReader((tmp_path / "a" / "pure-is.csv").open()))
    assert sorted(int(r["trial"]) for r in rows) == [0, 1]
    # the same seed resumes (nothing recomputed); another seed is refused in the same folder
    p = run_cli(*args, "--out", str(tmp_path / "a"), "--seed", "7", "--trials", "2")
    assert p.returncode == 0 and len(list(csv.DictReader((tmp_path / "a" / "pure-is.csv").open()))) == 2
    p = run_cli(*args, "--out", str(tmp_path / "a"), "--seed", "8", "--trials", "2")
    assert p.returncode == 2 and "--seed 7" in p.stderr
    # default: 5 trials, as the paper
    p = run_cli(*args, "--out", str(tmp_path / "b"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "b" / "pure-is.json").read_text())["seeds"] == [0, 1, 2, 3, 4]


def _png(path, arr, mode=None):
    from PIL import Image

    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    img.save(path)
    return path


def test_each_ground_truth_format(tmp_path):
    from PIL import Image

    from smartsam.eval.datasets import read_gt

    obj = np.zeros((6, 8), bool)
    obj[1:4, 2:6] = True
    # 0/255 and 0/1 masks
    assert (read_gt(_png(tmp_path / "a.png", np.where(obj, 255, 0).astype(np.uint8)))[0] == obj).all()
    gt, ig = read_gt(_png(tmp_path / "b.png", obj.astype(np.uint8)))
    assert (gt == obj).all() and ig is None
    # palette: 0 background, 255 void (ignored), other indices the object
    pal = np.where(obj, 3, 0).astype(np.uint8)
    pal[5, :] = 255
    img = Image.fromarray(pal, "P")
    img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 251) + [224, 224, 192])
    img.save(tmp_path / "c.png")
    gt, ig = read_gt(tmp_path / "c.png")
    assert (gt == obj).all() and ig[5].all() and ig.sum() == 8
    # 16-bit instance ids: nonzero is the object
    ids = np.where(obj, 1042, 0).astype(np.uint16)
    gt, ig = read_gt(_png(tmp_path / "d.png", ids))
    assert (gt == obj).all() and ig is None
    # 128: GrabCut's ignored band only where asked; elsewhere part of the object
    band = np.where(obj, 255, 0).astype(np.uint8)
    band[1, 2:6] = 128
    gt, ig = read_gt(_png(tmp_path / "e.png", band), band_128=True)
    assert gt.sum() == obj.sum() - 4 and ig.sum() == 4
    gt, ig = read_gt(tmp_path / "e.png")
    assert (gt == obj).all() and ig is None


def test_not_clicked_map_never_repeats_a_click():
    """RITM's not-clicked map: a segmenter that ignores clicks gets each next click on a new pixel,
    the best one not yet tried, instead of the same pixel again."""
    from smartsam.eval.clicker import _padded_dt

    gt = square_gt()
    c = Clicker(gt)
    empty = np.zeros_like(gt)
    seen = [c.make_next_click(empty).coords for _ in range(5)]
    assert seen[0] == (10, 10) and len(set(seen)) == 5
    dt = _padded_dt(gt)
    for k, (y, x) in enumerate(seen[1:], 1):
        left = dt.copy()
        for yy, xx in seen[:k]:
            left[yy, xx] = 0
        assert dt[y, x] == left.max()  # the farthest-from-boundary pixel not clicked yet


def test_references_for_gives_the_next_instances_of_the_category(datasets):
    samples = load_dataset(datasets / "COCO_MVal-dev")
    s = samples[0]
    three = __import__("smartsam.eval.datasets", fromlist=["references_for"]).references_for(s, samples, 3)
    assert len(three) == 3 and len({r.name for r in three}) == 3
    assert all(r.category == s.category and r.name != s.name for r in three)
    assert three[0] == reference_for(s, samples)  # K = 1 is the paper's single reference


def test_reference_mode_switches_preparation_and_exemplars(datasets, tmp_path):
    args = ["eval", "--dataset", str(datasets / "COCO_MVal-dev"), "--mode", "reference", "--limit", "1",
            "--max-clicks", "1", "--trials", "1", "--backbone", "disk-test", "--no-progress"]
    runs = {}
    for name, extra in [("paper1", []), ("none1", ["--reference-prep", "none"]), ("paper3", ["--exemplars", "3"])]:
        p = run_cli(*args, *extra, "--out", str(tmp_path / name))
        assert p.returncode == 0, p.stderr
        runs[name] = json.loads((tmp_path / name / "reference.json").read_text())
    assert (runs["paper1"]["reference_prep"], runs["paper1"]["exemplars"]) == ("paper", 1)
    assert (runs["none1"]["reference_prep"], runs["none1"]["exemplars"]) == ("none", 1)
    assert (runs["paper3"]["reference_prep"], runs["paper3"]["exemplars"]) == ("paper", 3)
    # a folder holds one setting: resuming with another is refused, not mixed
    p = run_cli(*args, "--exemplars", "3", "--out", str(tmp_path / "paper1"))
    assert p.returncode == 2 and "--exemplars 1" in p.stderr
    p = run_cli(*args, "--reference-prep", "none", "--out", str(tmp_path / "paper1"))
    assert p.returncode == 2 and "--reference-prep paper" in p.stderr
