"""The paper's experiments: ablation knobs, the action record, first-click protocols, datasets
(Amb-Occ builder, PartImageNet, DAVIS) and ``smartsam paper`` end to end. Known answers come from
hand-made cases, the oracle and empty segmenters and a scripted backbone whose winner is known."""

import csv
import functools
import json
from pathlib import Path
from typing import Any, Sequence, Tuple

import numpy as np
import pytest
from PIL import Image

import cli_helpers
from smartsam.backbones.base import Backbone, Prompt
from smartsam.masks import LowResFrame

ROOT = Path(__file__).resolve().parents[1]


run_cli = functools.partial(cli_helpers.run_cli, timeout=900)  # whole paper tables: longer than one eval


# -- the samplers -------------------------------------------------------------------------
def _mode(d: np.ndarray, width: float = 10.0) -> float:
    hist, edges = np.histogram(d, bins=np.arange(0, d.max() + width, width))
    hist = np.convolve(hist, np.ones(5) / 5, mode="same")  # a little smoothing: the peak, not a spike
    k = int(np.argmax(hist))
    return float((edges[k] + edges[k + 1]) / 2)


def test_gamma_and_normal_samplers_share_the_mode():
    from smartsam.sampler import PrioriInitialSampler

    rng = np.random.default_rng(0)
    g = PrioriInitialSampler(distribution="gamma").distances(200_000, rng)
    n = PrioriInitialSampler(distribution="normal").distances(200_000, rng)
    u = PrioriInitialSampler(distribution="uniform").distances(200_000, rng)
    assert abs(_mode(g) - 100) <= 15 and abs(_mode(n) - 100) <= 15  # beta * (shape - 1) = 100 px for both
    # a normal N(100, (100 sqrt 2)^2) truncated at 0: its standard deviation worked out in closed form
    import math

    mu, sigma = 100.0, 100.0 * math.sqrt(2.0)
    a = -mu / sigma
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    lam = phi / (1 - 0.5 * (1 + math.erf(a / math.sqrt(2))))
    assert (n >= 0).all() and abs(n.std() - sigma * math.sqrt(1 + a * lam - lam * lam)) < 1.5
    assert abs(g.std() - sigma) < 1.5  # the Gamma's own spread, which the normal takes before truncation
    assert abs(g.mean() - 200) < 2 and abs(u.mean() - 200) < 2 and u.max() <= 400  # uniform: the Gamma's mean
    none = PrioriInitialSampler(distribution="none")
    prompts = none.sample((50, 50), (100, 100), rng)
    assert none.num_prompts == 1 and [p.kind for p in prompts] == ["click"]
    with pytest.raises(ValueError, match="distribution"):
        PrioriInitialSampler(distribution="cauchy")


def test_random_clicker_and_no_chains():
    from smartsam.clickers import ADD, CUT, NextChainClicker

    frame = LowResFrame(image_hw=(256, 256), valid_hw=(256, 256), scale_xy=(1.0, 1.0))
    yy, xx = np.mgrid[:256, :256]
    logits = np.where((yy - 128) ** 2 + (xx - 128) ** 2 < 40 ** 2, 5.0, -5.0).astype(np.float32)
    ck = NextChainClicker(placement="random")
    rng = np.random.default_rng(1)
    cuts = [ck.place(logits, CUT, 1.0, frame, rng) for _ in range(50)]
    adds = [ck.place(logits, ADD, 1.0, frame, rng) for _ in range(50)]
    assert all(logits[int(round(y)), int(round(x))] > 0 for x, y in cuts)  # a random pixel inside, band or not
    assert all(logits[int(round(y)), int(round(x))] <= 0 for x, y in adds)
    assert len({c for c in cuts}) > 10
    assert NextChainClicker(placement="ncc").place(logits, CUT, 1.0, frame) is None  # no uncertain pixel: no click
    assert NextChainClicker(chain_length=3, placement="none").chain_length == 0


# -- the action record on a scripted backbone -----------------------------------------------
class Scripted(Backbone):
    """A ring of uncertainty around the first point (logits +10 inside, -10 far out, a ramp
    between), and scores from a script indexed by the chain's clicks: ``script[k]`` after k inner
    clicks. Scores <= 0 make every chain click an Add (Bernoulli(0)), >= 1 a Cut."""

    def __init__(self, script: Sequence[float]) -> None:
        super().__init__("scripted-test", device="cpu")
        self.script = list(script)
        self.random_weights = True

    def _encode(self, image: np.ndarray) -> Any:
        return None

    def _activate(self, state: Any, image_hw: Tuple[int, int]) -> None:
        pass

    def _frame(self, image_hw):
        h, w = image_hw
        return LowResFrame(image_hw=(h, w), valid_hw=(256, 256), scale_xy=(w / 256.0, h / 256.0))

    def _decode(self, prompts: Sequence[Prompt], multimask: bool):
        import torch

        frame = self._frame(self.image_hw)
        m = 3 if multimask else 1
        out = np.zeros((len(prompts), m, 256, 256), np.float32)
        scores = np.zeros((len(prompts), m), np.float32)
        yy, xx = np.mgrid[:256, :256]
        for i, p in enumerate(prompts):
            c = p.points[0] if len(p.points) else ((p.box[:2] + p.box[2:]) / 2)
            cx, cy = frame.from_image(np.asarray(c))[0]
            d = np.hypot(xx - cx, yy - cy)
            base = 0 if p.box is not None else 1
            k = len(p.points) - base
            for j in range(m):
                r = 20.0 + 10 * j
                out[i, j] = np.clip(10 - 10 * d / r, -10, 10)
                scores[i, j] = self.script[min(k, len(self.script) - 1)] - 0.01 * j
        return torch.as_tensor(out), torch.as_tensor(scores)

    def _upsample(self, low_res, image_hw):
        import torch.nn.functional as F

        return F.interpolate(low_res.float(), tuple(image_hw), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("script, actions, name", [
    ([-1.0, -0.8, -0.6, -0.4], ("Add", "Add", "Add"), "Add"),
    ([1.0, 1.1, 1.2, 1.3], ("Cut", "Cut", "Cut"), "Cut"),
    ([1.0, -0.5, 2.0, 3.0], ("Cut", "Add", "Cut"), "Add&Cut"),
    ([3.0, -1.0, -1.0, -1.0], (), "no action"),
])
def test_the_action_record_names_the_known_winner(script, actions, name, tmp_path):
    from smartsam.agent import SmartSAMAgent
    from smartsam.eval.datasets import Sample
    from smartsam.eval.runner import evaluate
    from smartsam.eval.segmenters import AgentSegmenter

    bb = Scripted(script)
    agent = SmartSAMAgent(bb, dedupe_iou=None)
    img = np.zeros((200, 300, 3), np.uint8)
    agent.set_image(img)
    res = agent.predict((150, 100))
    assert res.candidate.actions == actions and res.candidate.action == name
    assert res.candidate.chain_step == len(actions) and res.candidate.prompt_kind == "click"  # first of the ties
    # through the harness: the CSV records it, the summary counts it (Table 7)
    gt = np.zeros((200, 300), bool)
    gt[80:120, 130:170] = True
    s = evaluate([Sample("x", Path("x.png"), Path("x.png"), "")], lambda t: AgentSegmenter(SmartSAMAgent(bb, dedupe_iou=None)),
                 tmp_path, "pure-is", "scripted", max_clicks=1, progress=False, loader=lambda smp: (img, gt, None))
    row = next(csv.DictReader((tmp_path / "pure-is.csv").open()))
    assert row["winner"] == "click:" + "".join(a[0] for a in actions)
    assert s["actions"]["action"][name] == 1 and sum(s["actions"]["action"].values()) == 1
    assert s["actions"]["inner_clicks"] == {str(len(actions)): 1}


# -- first-click protocols ----------------------------------------------------------------
def test_first_click_protocols_by_hand():
    from smartsam.eval import first_click as fc

    gt = np.zeros((60, 100), bool)
    gt[10:50, 20:80] = True  # 40 x 60: its middle is row 29/30, the deepest pixels 20 from the boundary
    r, c = fc.center_position(gt)
    assert 29 <= r <= 30 and 20 + 19 <= c <= 80 - 20
    rng = np.random.default_rng(0)
    pts = fc.inside_positions(gt, rng, 200, 8)
    assert all(gt[y, x] and min(y - 10, 49 - y, x - 20, 79 - x) >= 7 for y, x in pts)
    assert len(set(pts)) > 50
    thin = np.zeros((60, 100), bool)
    thin[30, 10:90] = True  # thinner than the distance asked: its deepest pixels
    assert all(thin[y, x] for y, x in fc.inside_positions(thin, rng, 10, 8))
    assert fc.worst_position([(1, 1), (2, 2), (3, 3)], lambda p: {1: 0.5, 2: 0.1, 3: 0.1}[p[0]]) == (2, 2)
    area = np.zeros((60, 100), bool)
    area[20:30, 60:70] = True
    ar, ac = fc.area_position(area)
    assert 24 <= ar <= 25 and 64 <= ac <= 65
    with pytest.raises(ValueError, match="click area"):
        fc.area_position(None)


def _write_coco(tmp_path: Path):
    """Two images, COCO instances and LVIS instances on them, written as the datasets' JSON."""
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in (1, 2):
        Image.fromarray(np.full((120, 160, 3), 40 * i, np.uint8)).save(imgs / f"{i:012d}.jpg")

    def box(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    def ann(i, image, cat, poly, crowd=0):
        xs, ys = poly[0][0::2], poly[0][1::2]
        return {"id": i, "image_id": image, "category_id": cat, "segmentation": poly, "iscrowd": crowd,
                "area": (max(xs) - min(xs)) * (max(ys) - min(ys)), "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]}

    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 120, "width": 160} for i in (1, 2)],
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
            "annotations": [ann(10, 1, 1, box(10, 10, 70, 110)),        # a person: kept (a hat inside it)
                            ann(11, 1, 3, box(90, 60, 130, 100)),       # car ...
                            ann(12, 1, 3, box(110, 70, 150, 110)),      # ... overlapping another car: clustered
                            ann(20, 2, 1, box(20, 20, 80, 100)),        # a person whose LVIS part is too big
                            ann(21, 2, 3, box(100, 10, 150, 50)),       # a car with a sticker half outside it
                            ann(22, 2, 1, box(0, 0, 10, 10), crowd=1)]}  # a crowd of persons in image 2
    lvis = {"images": coco["images"], "categories": [{"id": 100, "name": "hat"}, {"id": 101, "name": "sticker"}],
            "annotations": [ann(1000, 1, 100, box(25, 12, 45, 30)),    # hat inside the person of image 1
                            ann(1001, 1, 101, box(95, 65, 105, 75)),   # sticker on the clustered car
                            ann(1002, 2, 100, box(22, 22, 78, 98)),    # nearly the whole person: not smaller
                            ann(1003, 2, 101, box(140, 30, 160, 45))]}  # half outside the car
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "lvis.json").write_text(json.dumps(lvis))
    return imgs


def test_amb_occ_builder_keeps_the_contained_pairs_and_filters_the_rest(tmp_path):
    imgs = _write_coco(tmp_path)
    out = tmp_path / "ambocc"
    p = run_cli("datasets", "amb-occ", "--coco", str(tmp_path / "coco.json"), "--lvis", str(tmp_path / "lvis.json"),
                "--images", str(imgs), "--out", str(out), "--min-area", "100")
    assert p.returncode == 0, p.stderr
    assert "1 images, 1 pairs, 1 categories" in p.stdout and "2,744 / 4,470 / 80" in p.stdout
    st = json.loads((out / "stats.json").read_text())
    assert [(x["coco_id"], x["lvis_id"]) for x in st["list"]] == [(10, 1000)]
    assert st["filtered"]["clustered"] == 2 and st["filtered"]["crowd"] == 2  # both cars of image 1; image 2's persons
    name = st["list"][0]["name"]
    assert name == "person00_000000000001"
    gt = np.asarray(Image.open(out / "gt" / f"{name}.png")) > 0
    area = np.asarray(Image.open(out / "area" / f"{name}.png")) > 0
    assert gt[60, 40] and not gt[60, 100] and area[20, 35] and not area[60, 40] and (area <= gt).all()
    # the area protocol on it: the oracle's first click lies in the area; empty gives 0
    for mode, miou in (("oracle", 100.0), ("empty", 0.0)):
        p = run_cli("eval", "--dataset", str(out), "--mode", mode, "--first-click", "area", "--max-clicks", "2",
                    "--trials", "1", "--out", str(tmp_path / mode), "--no-progress")
        assert p.returncode == 0, p.stderr
        s = json.loads((tmp_path / mode / f"{mode}.json").read_text())
        assert s["mIoU@1"] == miou and s["first_click"] == "area"
        x, y, pos = next(csv.DictReader((tmp_path / mode / f"{mode}.csv").open()))["clicks"].split()[0].split(",")
        assert area[int(y), int(x)] and pos == "1"
    p = run_cli("eval", "--dataset", str(ROOT.parent / "shared" / "datasets" / "GrabCut"), "--mode", "oracle", "--limit", "1",
                "--first-click", "area", "--trials", "1", "--out", str(tmp_path / "noarea"), "--no-progress")
    assert p.returncode == 2 and "click area" in p.stderr


def test_every_first_click_protocol_on_the_oracle_and_empty_segmenters(tmp_path, datasets):
    for fcp in ("center", "inside-random", "inside-worst"):
        for mode, miou, noc in (("oracle", 100.0, 1.0), ("empty", 0.0, 3.0)):
            out = tmp_path / f"{fcp}-{mode}"
            p = run_cli("eval", "--dataset", str(datasets / "GrabCut"), "--mode", mode, "--limit", "2", "--max-clicks", "3",
                        "--trials", "2", "--first-click", fcp, "--backbone", "disk-test", "--out", str(out), "--no-progress")
            assert p.returncode == 0, p.stderr
            s = json.loads((out / f"{mode}.json").read_text())
            assert (s["mIoU@1"], s["NoC@90"]) == (miou, noc) and s["first_click"] == fcp
            rows = list(csv.DictReader((out / f"{mode}.csv").open()))
            firsts = {(r["sample"], r["trial"]): tuple(int(v) for v in r["clicks"].split()[0].split(",")[:2]) for r in rows}
            if fcp == "inside-random":  # seeded per sample and trial: another trial, another place
                assert firsts[("106024", "0")] != firsts[("106024", "1")]
            if fcp == "center":
                assert firsts[("106024", "0")] == firsts[("106024", "1")]
    # the same seed, the same positions (a rerun elsewhere gives the same first clicks)
    a = list(csv.DictReader((tmp_path / "inside-random-oracle" / "oracle.csv").open()))
    b = list(csv.DictReader((tmp_path / "inside-random-empty" / "empty.csv").open()))
    assert [r["clicks"].split()[0] for r in a] == [r["clicks"].split()[0] for r in b]
    # resuming a folder with another protocol is refused
    p = run_cli("eval", "--dataset", str(datasets / "GrabCut"), "--mode", "oracle", "--limit", "2", "--max-clicks", "3",
                "--trials", "2", "--first-click", "center", "--out", str(tmp_path / "inside-random-oracle"), "--no-progress")
    assert p.returncode == 2 and "first-click" in p.stderr


def test_inside_worst_is_the_plain_backbones_worst(tmp_path, datasets):
    """disk-test draws disks at the click: the worst of the positions is where the plain backbone's
    disk overlaps the object least; every method is then clicked there."""
    from smartsam.eval import first_click as fc
    from smartsam.eval.datasets import load_dataset, load_sample
    from smartsam.masks import best_of_three, mask_iou
    from smartsam.models import load_backbone

    out = tmp_path / "w"
    p = run_cli("eval", "--dataset", str(datasets / "GrabCut"), "--mode", "pure-is", "--limit", "1", "--max-clicks", "1",
                "--trials", "1", "--first-click", "inside-worst", "--worst-of", "6", "--backbone", "disk-test",
                "--out", str(out), "--no-progress", env={"SMARTSAM_CHAIN_LENGTH": "1"})
    assert p.returncode == 0, p.stderr
    row = next(csv.DictReader((out / "pure-is.csv").open()))
    x, y = (int(v) for v in row["clicks"].split(",")[:2])
    sample = load_dataset(datasets / "GrabCut")[0]
    image, gt, ignore = load_sample(sample)
    bb = load_backbone("disk-test")
    bb.set_image(image)
    cands = fc.inside_positions(gt, np.random.default_rng(fc.sample_seed(sample.name, 0, 0)), 6, 5.0)

    def iou(yx):
        r = bb.predict([Prompt([[yx[1], yx[0]]], [1])], multimask=True)
        return mask_iou(bb.upsample(r.low_res_logits[0, [best_of_three(r.scores[0])]])[0] > 0, gt, ignore)

    assert (y, x) == min(cands, key=iou)


# -- datasets ------------------------------------------------------------------------------
def test_partimagenet_and_davis_targets_are_whole_objects(tmp_path):
    from smartsam.eval.coco import load_coco_objects
    from smartsam.eval.datasets import load_dataset, load_sample

    imgs = tmp_path / "images"
    imgs.mkdir()
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(imgs / "n01_1.JPEG")
    parts = {"images": [{"id": 7, "file_name": "n01_1.JPEG", "height": 50, "width": 80}],
             "categories": [{"id": 1, "name": "Quadruped Head", "supercategory": "Quadruped"},
                            {"id": 2, "name": "Quadruped Body", "supercategory": "Quadruped"}],
             "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": [[5, 5, 20, 5, 20, 20, 5, 20]]},
                             {"id": 2, "image_id": 7, "category_id": 2, "iscrowd": 0,
                              "segmentation": {"size": [50, 80], "counts": [40 * 50 + 30, 10, 40, 10]}}]}
    (tmp_path / "parts.json").write_text(json.dumps(parts))
    samples, loader = load_coco_objects(tmp_path / "parts.json", imgs)
    assert [(s.name, s.category, s.ann_ids) for s in samples] == [("n01_1", "Quadruped", (1, 2))]
    _, gt, _ = loader(samples[0])
    assert gt[10, 10] and gt[30, 40] and gt[31, 41] and not gt[45, 70]  # head (polygon) and body (RLE): one object
    p = run_cli("eval", "--dataset", str(tmp_path / "parts.json"), "--images", str(imgs), "--mode", "oracle", "--trials", "1",
                "--max-clicks", "1", "--out", str(tmp_path / "pin"), "--no-progress")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "pin" / "oracle.json").read_text())["mIoU@1"] == 100.0
    # DAVIS in the RITM layout: every instance id of an image is the one target
    davis = tmp_path / "DAVIS"
    (davis / "img").mkdir(parents=True)
    (davis / "gt").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(davis / "img" / "bear.jpg")
    ids = np.zeros((40, 40), np.uint8)
    ids[5:15, 5:15], ids[20:30, 20:30] = 1, 2
    pal = Image.fromarray(ids, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(davis / "gt" / "bear.png")
    _, gt, _ = load_sample(load_dataset(davis)[0])
    assert gt[10, 10] and gt[25, 25] and gt.sum() == 200


def test_compressed_rle_decodes_as_coco_encodes():
    """COCO's compressed counts: the string of a known mask, encoded here with the same
    algorithm pycocotools uses (LEB128-like, 5 bits per char, deltas after the second run)."""
    from smartsam.eval.coco import _rle_counts, decode

    def encode(counts):
        s = []
        for i, x in enumerate(counts):
            if i > 2:
                x -= counts[i - 2]
            more = True
            while more:
                c = x & 0x1F
                x >>= 5
                more = not ((c & 0x10 == 0 and x == 0) or (c & 0x10 and x == -1))
                if more:
                    c |= 0x20
                s.append(chr(c + 48))
        return "".join(s)

    m = np.zeros((6, 7), bool)
    m[1:4, 2:5] = True
    m[5, 6] = True
    flat = m.T.reshape(-1)  # column-major, as COCO
    runs, cur, n = [], False, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    assert _rle_counts(encode(runs)) == runs
    assert (decode({"size": [6, 7], "counts": encode(runs)}, 6, 7) == m).all()
    assert (decode({"size": [6, 7], "counts": runs}, 6, 7) == m).all()


# -- the ablation flags in smartsam eval, and smartsam paper -------------------------------------
def test_ablation_flags_reach_the_agent_and_are_named(tmp_path, datasets):
    out = tmp_path / "a"
    args = ["eval", "--dataset", str(datasets / "GrabCut"), "--mode", "pure-is", "--limit", "1", "--max-clicks", "1",
            "--trials", "1", "--backbone", "disk-test", "--out", str(out), "--no-progress"]
    p = run_cli(*args, "--sampler", "uniform", "--points", "2", "--boxes", "1", "--clicker", "random", "--chain-length", "2",
                "--band-fraction", "0.3", "--band-percentile", "80")
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "pure-is.json").read_text())
    assert s["agent"] == {"sampler": "uniform", "points": 2, "boxes": 1, "beta": 100.0, "gamma_shape": 2.0, "clicker": "random",
                          "chain_length": 2, "band_fraction": 0.3, "band_percentile": 80.0, "path": s["path"]}
    assert '"sampler": "uniform"' in p.stdout  # named in the printed output too
    p = run_cli(*args, "--sampler", "gamma")
    assert p.returncode == 2 and "holds pure-is results" in p.stderr  # another setting in the same folder is refused
    p = run_cli(*args[:-3], "--out", str(tmp_path / "b"), "--no-progress", "--points", "-1")
    assert p.returncode == 2


def test_paper_end_to_end_with_the_test_and_random_backbones(tmp_path, datasets):
    imgs = _write_coco(tmp_path)
    amb = tmp_path / "AmbOcc"
    assert run_cli("datasets", "amb-occ", "--coco", str(tmp_path / "coco.json"), "--lvis", str(tmp_path / "lvis.json"),
                   "--images", str(imgs), "--out", str(amb), "--min-area", "100").returncode == 0
    out = tmp_path / "paper"
    # published numbers for this backbone: names in other cases, a metric two tables give differently,
    # and rows that must not match (another backbone, a setting we do not run, a dataset we lack)
    pub = [{"table": "3", "backbone": "disk-test", "dataset": "grabcut", "setting": "plain backbone", "metric": "NoC@90", "value": 5.0},
           {"table": "1", "backbone": "disk-test", "dataset": "GRABCUT", "setting": "plain backbone", "metric": "mIoU@1", "value": 40.0},
           {"table": "9", "backbone": "disk-test", "dataset": "GrabCut", "setting": "plain backbone", "metric": "mIoU@1", "value": 41.0},
           {"table": "6", "backbone": "disk-test", "dataset": "Amb-Occ", "setting": "random sampler, no chains",
            "metric": "IoU_best", "value": 60.0, "note": "fixture"},
           {"table": "1", "backbone": "sam_vit_h", "dataset": "GrabCut", "setting": "plain backbone", "metric": "mIoU@1", "value": 1.0},
           {"table": "6", "backbone": "disk-test", "dataset": "GrabCut", "setting": "no such row", "metric": "IoU_best", "value": 1.0},
           {"table": "1", "backbone": "disk-test", "dataset": "DAVIS", "setting": "plain backbone", "metric": "mIoU@1", "value": 1.0}]
    (tmp_path / "pub.json").write_text(json.dumps(pub))
    cmd = ["paper", "--dataset", str(datasets / "GrabCut"), "--dataset", str(amb), "--limit", "1", "--trials", "1",
           "--max-clicks", "2", "--backbone", "disk-test", "--out", str(out), "--quiet", "--published", str(tmp_path / "pub.json")]
    p = run_cli(*cmd, env={"SMARTSAM_CHAIN_LENGTH": "1"})
    assert p.returncode == 0, p.stderr
    assert "| 3 | GrabCut | plain backbone | NoC@90 | 5.00 |" in p.stdout  # printed paper vs ours
    versus = list(csv.DictReader((out / "tables" / "paper_vs_ours.csv").open()))
    assert sorted((v["table"], v["dataset"], v["metric"]) for v in versus) == [
        ("1", "GrabCut", "mIoU@1"), ("3", "GrabCut", "NoC@90"), ("6", "AmbOcc", "IoU_best"), ("9", "GrabCut", "mIoU@1")]
    t1 = next(r for r in csv.DictReader((out / "tables" / "1.csv").open()) if r["dataset"] == "GrabCut")
    assert t1["setting"] == "plain backbone" and (t1["paper mIoU@1"], t1["paper mIoU@1 (Table 9)"], t1["paper NoC@90"]) == \
        ("40.0", "41.0", "5.0")
    assert {v["metric"]: v["ours"] for v in versus if v["dataset"] == "GrabCut"} == {"mIoU@1": t1["mIoU@1"], "NoC@90": t1["NoC@90"]}
    t6amb = next(r for r in csv.DictReader((out / "tables" / "6.csv").open()) if r["dataset"] == "AmbOcc"
                 and r["setting"] == "random sampler, no chains")
    assert t6amb["paper IoU_best"] == "60.0" and t6amb["cell"] == "pure-is__clicker-none__sampler-uniform"
    md = (out / "paper.md").read_text()
    for title in ("Table 1 / 3 / 9", "Table 6", "Table 7", "Table 10", "Table 12", "Fig. 10", "Fig. 15", "Amb-Occ"):
        assert title in md, title
    assert md.count("RANDOM weights") >= 8  # every table says so
    assert (out / "fig10.png").stat().st_size > 1000 and (out / "fig15.png").stat().st_size > 1000
    t6 = list(csv.DictReader((out / "tables" / "6.csv").open()))
    assert [r["setting"] for r in t6 if r["dataset"] == "GrabCut"][0].startswith("neither") and len(t6) == 14
    assert len(list(csv.DictReader((out / "tables" / "fig15.csv").open()))) == 12
    amb_rows = list(csv.DictReader((out / "tables" / "ambocc.csv").open()))
    assert len(amb_rows) == 2 and all(r["dataset"] == "AmbOcc" for r in amb_rows)  # only the dataset with areas
    cells = sorted(d.name for d in (out / "GrabCut").iterdir())
    assert "pure-is" in cells and "pure-is__sampler-none__clicker-none" not in cells  # flags sorted in the key
    assert len(cells) == len(set(cells)) and "pure-is__clicker-none__sampler-none" in cells
    first = {d.name: (d / f"{d.name.split('__')[0]}.csv").stat().st_mtime_ns for d in (out / "GrabCut").iterdir()}
    p = run_cli(*cmd, env={"SMARTSAM_CHAIN_LENGTH": "1"})  # resumes: nothing is run again
    assert p.returncode == 0 and first == {d.name: (d / f"{d.name.split('__')[0]}.csv").stat().st_mtime_ns
                                           for d in (out / "GrabCut").iterdir()}
    # the real architectures with random weights, two tables
    out2 = tmp_path / "paper2"
    p = run_cli("paper", "--dataset", str(datasets / "GrabCut"), "--limit", "1", "--trials", "1", "--max-clicks", "1",
                "--backbone", "sam_vit_tiny-random", "--tables", "1,7", "--out", str(out2), "--quiet",
                env={"SMARTSAM_CHAIN_LENGTH": "1"})
    assert p.returncode == 0, p.stderr
    md = (out2 / "paper.md").read_text()
    assert "sam_vit_tiny-random" in md and "RANDOM weights" in md and "Table 7" in md and "Table 6" not in md
    t7 = next(csv.DictReader((out2 / "tables" / "7.csv").open()))
    assert sum(int(t7[f"action {k}"]) for k in ("no action", "Add", "Cut", "Add&Cut")) == 1
    p = run_cli("paper", "--dataset", str(datasets / "GrabCut"), "--tables", "99", "--out", str(out2), "--backbone", "disk-test")
    assert p.returncode == 2 and "unknown tables" in p.stderr


def test_the_shipped_paper_numbers_match_cells_the_matrix_runs():
    """The paper's numbers ship with the code (the shared notes' copy, unchanged) and every one of
    them names a backbone of the registry and a (table, setting, metric) that ``smartsam paper``
    measures on a dataset with categories (DAVIS, PartImageNet, Amb-Occ): nothing the paper has is
    left without a cell."""
    from smartsam.eval.paper import METRICS, PAPER_TABLES, published, matrix, TABLES
    from smartsam.models import REGISTRY

    pub = published()
    shared = ROOT.parent / "shared" / "notes" / "paper_published.json"
    if shared.exists():
        assert pub == json.loads(shared.read_text())
    assert len(pub) >= 100 and {str(p["table"]) for p in pub} == {"1", "3", "6", "7", "9", "10", "12"}
    assert published("none") == []
    ours = {(t, r.setting) for r in matrix(TABLES, categories=True, areas=True)
            for t in PAPER_TABLES.get(r.table, (r.table,))}
    missing = sorted({(str(p["table"]), p["setting"]) for p in pub} - ours)
    assert missing == []
    metrics = set(METRICS) | {f"action {a}" for a in ("Add", "Cut", "Add&Cut", "no action")} | {f"{k} inner" for k in range(1, 6)}
    assert {p["metric"] for p in pub} <= metrics and {p["backbone"] for p in pub} <= set(REGISTRY)
