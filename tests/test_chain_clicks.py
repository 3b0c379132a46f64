"""The chain clicks as batched tensor work (smartsam.chain_clicks) against the OpenCV path they
replace on a GPU: the same components, peaks and clicks, exactly, on fixed inputs (ties, empty
sides, regions at the image edge), and the same candidates and mask through the agent."""

import cv2
import numpy as np
import pytest
import torch

from smartsam import chain_clicks as cc
from smartsam import device_masks
from smartsam.agent import FAST_PATH_IOU, SmartSAMAgent
from smartsam.clickers import ADD, CUT, NextChainClicker
from smartsam.host_transfers import host_transfers
from smartsam.masks import (LowResFrame, batch_iou, largest_component, largest_component_center, region_center,
                            uncertainty_band)
from smartsam.selector import contains_click
from smartsam.models import load_backbone

# the device code runs where the logits are: the CPU always, CUDA where there is one
# (scripts/gpu-check.sh runs this file on a lent GPU)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def regions(seed: int, n: int = 60):
    """Fixed maps of every kind the clicker meets: smooth blobs, salt noise (many equal-area
    components), and hand-made ties, empty and full maps, regions on the border."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        h, w = int(rng.integers(5, 70)), int(rng.integers(5, 70))
        if k % 3 == 0:
            out.append(rng.random((h, w)) < 0.35)
        else:
            z = cv2.GaussianBlur(rng.normal(size=(h, w)).astype(np.float32), (0, 0), float(rng.uniform(0.5, 3)))
            out.append(z > rng.uniform(-0.3, 0.5))
    tie = np.zeros((8, 12), bool)
    tie[1, 0] = tie[0, 5] = True  # equal areas; the first in pixel order is not OpenCV's first
    square = np.zeros((9, 9), bool)
    square[2:7, 2:7] = True  # a plateau of equal distances: the first in row-major order
    edge = np.zeros((10, 10), bool)
    edge[:, :4] = True  # touching the border: the border counts as boundary
    return out + [tie, square, edge, np.zeros((6, 7), bool), np.ones((6, 7), bool)]


def serpentine(h: int = 64, w: int = 64) -> np.ndarray:
    """One path through every other column, down one and up the next: a component as long as
    a map allows, the labelling's slowest case."""
    m = np.zeros((h, w), bool)
    m[:, ::2] = True
    m[-1, 1::4] = True
    m[0, 3::4] = True
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_components_and_peaks_equal_opencv(seed, device):
    """Unbounded, and within the bounds place_clicks uses: the component and the peak are
    OpenCV's wherever the flag says exact (always, unbounded; the labelling's rounds suffice for
    every map here, the distance window for the thin ones)."""
    windowed = 0
    for reg in regions(seed) + [serpentine()]:
        want = largest_component(reg)
        for rounds in (None, cc.LABEL_ROUNDS):
            got, final = cc.largest_components(torch.from_numpy(reg).to(device)[None], rounds)
            assert bool(final) and (got[0].cpu().numpy() == want).all(), reg.astype(int)
        for window in (None, cc.DISTANCE_WINDOW):
            xy, ok, exact = cc.region_peaks(torch.from_numpy(want).to(device)[None], window)
            assert bool(exact) or window is not None
            if bool(exact):
                assert (tuple(int(v) for v in xy[0]) if ok[0] else None) == region_center(want), want.astype(int)
                windowed += window is not None
    assert windowed > 30  # most maps here are within the window (the blobs of sigma 3 are not)


def tie_map() -> np.ndarray:
    """A map with two pixels at the same largest distance from its boundary, on which OpenCV's
    precise transform (IPP, in the opencv-python wheels) returns one of the two distances one
    float32 step off or not, depending on the transforms before it (found by searching maps drawn
    like these, the 2820th of this stream)."""
    rng = np.random.default_rng(5)
    for k in range(2820):
        h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
        m = np.zeros((h, w), bool)
        if k % 3 == 0:
            for _ in range(int(rng.integers(1, 6))):
                y0, x0 = rng.integers(h), rng.integers(w)
                m[y0:y0 + rng.integers(1, 20), x0:x0 + rng.integers(1, 20)] = True
        elif k % 3 == 1:
            m = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        else:
            z = cv2.GaussianBlur(rng.normal(size=(h, w)).astype(np.float32), (0, 0), float(rng.uniform(0.5, 8)))
            m = z > rng.uniform(-0.5, 0.5)
            m[rng.random((h, w)) < 0.05] ^= True
    return m


def test_the_host_center_is_the_same_at_every_call():
    """Ties go to the first pixel in row-major order at every call, whatever transforms came
    before (region_center compares exact squared distances, not OpenCV's float32 roots), as the
    device path's exact integers give it."""
    m = tie_map()
    xy, ok, _ = cc.region_peaks(torch.from_numpy(m)[None])
    want = tuple(int(v) for v in xy[0])
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        seen.add(region_center(m))
        other = (rng.random((int(rng.integers(2, 90)), int(rng.integers(2, 90)))) < 0.6).astype(np.uint8)
        cv2.distanceTransform(other, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    assert seen == {want}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_host_s_cropped_transform_finds_the_same_center(seed):
    """The host path's distance transform over the largest component's box gives the point the
    whole map's transform gives (ties included: the plateau, the border, equal areas)."""
    for reg in regions(seed) + [serpentine()]:
        assert largest_component_center(reg) == region_center(largest_component(reg)), reg.astype(int)


@pytest.mark.parametrize("device", DEVICES)
def test_too_few_rounds_or_too_narrow_a_window_say_so(device):
    """The flags are honest: a serpentine after one round of labelling, and a wide region seen
    through a one-column window, are not final; the unbounded answers are."""
    path = torch.from_numpy(serpentine())[None].to(device)
    labels, final = cc.component_labels(path, rounds=1)
    assert not bool(final) and len(torch.unique(labels[path])) > 1  # not yet one component
    labels, final = cc.component_labels(path)
    assert bool(final) and len(torch.unique(labels[path])) == 1
    blob = np.zeros((40, 40), bool)
    blob[5:35, 3:37] = True
    d2, exact = cc.squared_distances(torch.from_numpy(blob)[None].to(device), window=1)
    full, exact_full = cc.squared_distances(torch.from_numpy(blob)[None].to(device))
    assert not bool(exact) and bool(exact_full) and not torch.equal(d2, full)


@pytest.mark.parametrize("window", [None, 1, 16, 70])
def test_squared_distances_are_exact(window):
    """Exact against OpenCV wherever the flag says so: unbounded, and with a window as wide as
    the map, always; a 1-pixel window is not enough for this blob, and says so."""
    reg = regions(2)[1]
    d, exact = cc.squared_distances(torch.from_numpy(reg)[None], window)
    want = cv2.distanceTransform(np.pad(reg.astype(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    assert bool(exact) == (window != 1) or window == 16
    if bool(exact):
        assert np.allclose(np.sqrt(d[0].numpy()), want, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("valid_hw", [(256, 256), (171, 256)])  # SAM 2.1 stretches; SAM pads the bottom
def test_a_steps_clicks_equal_the_one_chain_path(valid_hw, device):
    """30 chains' logits, both signs: the batch gives each chain the click place() gives it,
    including chains with nothing uncertain on their side (None)."""
    rng = np.random.default_rng(7)
    g = 256
    logits = np.stack([cv2.GaussianBlur(rng.normal(size=(g, g)).astype(np.float32), (0, 0), 6) * 40 for _ in range(28)])
    logits = np.concatenate([logits, np.full((2, g, g), 5.0, np.float32)])  # all inside: an Add has nowhere to go
    labels = np.asarray([CUT, ADD] * 14 + [ADD, CUT])
    frame = LowResFrame((int(valid_hw[0] * 2.5), 640), valid_hw, (640 / valid_hw[1], valid_hw[0] * 2.5 / valid_hw[0]))
    clicker = NextChainClicker()
    band = clicker.band(logits[:28], frame)
    for bounded in (True, False):
        xy, ok, exact = cc.place_clicks(torch.from_numpy(logits).to(device), torch.from_numpy(labels == CUT).to(device),
                                        band, valid_hw, bounded=bounded)
        xy, ok = xy.cpu(), ok.cpu()
        assert bool(exact)
        for k in range(len(logits)):
            want = clicker.place(logits[k], int(labels[k]), band, frame)
            got = tuple(float(v) for v in frame.to_image(xy[k: k + 1].numpy())[0]) if ok[k] else None
            assert got == want, k
    assert not ok[28] and int(ok[:28].sum()) >= 20  # the all-inside Add ends; most chains go on


def test_next_clicks_draws_the_same_signs_and_places_the_same_clicks():
    rng = np.random.default_rng(3)
    logits = [cv2.GaussianBlur(rng.normal(size=(256, 256)).astype(np.float32), (0, 0), 5) * 30 for _ in range(6)]
    scores = [0.0, 1.0, 0.5, 0.2, 0.9, 0.6]
    frame = LowResFrame((480, 640), (256, 256), (2.5, 1.875))
    clicker = NextChainClicker()
    streams = lambda: [np.random.default_rng([5, k]) for k in range(6)]  # noqa: E731
    host = clicker.next_clicks(logits, scores, 1.0, frame, streams())
    dev = clicker.next_clicks(logits, scores, 1.0, frame, streams(), device=torch.device("cpu"))
    assert host == dev and all(c is not None for c in host)
    assert host[0].label == ADD and host[1].label == CUT  # Bernoulli(0) and Bernoulli(1)


@pytest.mark.slow  # model work over many rows: make test, not the inner loop
@pytest.mark.parametrize("device", DEVICES)
# the literal path choosing by score; the fast path choosing by similarity to a mask reference
@pytest.mark.parametrize("dedupe", [None, FAST_PATH_IOU])
def test_the_agent_gives_the_same_candidates_and_mask(grabcut_image, device, dedupe, dino):
    """SAM 2.1's real architecture (random weights), chains of 3: with the step on the device
    (logits kept there, clicks, band, de-duplication and click test as tensor work), the
    candidates, scores, choice, mask and decoder calls (2 prompt kinds x 4 steps) are the host
    path's; the device path reads back one tensor per stage, one with the candidates (asked for;
    a reference's features need them anyway) and one for the answer."""
    bb = load_backbone("sam2.1_hiera_tiny-random", device=device)
    out, calls, moved = {}, {}, {}
    for where in ("host", "device"):
        agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=3), chain_clicks=where, dedupe_iou=dedupe,
                              image_features=dino if dedupe is not None else None)
        reference = None
        if dedupe is not None:
            ref_mask = np.zeros(grabcut_image.shape[:2], bool)
            ref_mask[100:250, 150:350] = True
            reference = agent.reference_from_mask(grabcut_image, ref_mask)
        agent.set_image(grabcut_image)
        before = bb.decoder_calls
        with host_transfers() as moved[where]:
            out[where] = agent.predict((240, 160), reference=reference, return_candidates=True)
        calls[where] = bb.decoder_calls - before
    h, d = out["host"], out["device"]
    assert len(h.candidates) > 30 and [c.clicks for c in h.candidates] == [c.clicks for c in d.candidates]
    assert [c.score for c in h.candidates] == [c.score for c in d.candidates]
    assert max(c.chain_step for c in h.candidates) == 3
    if dedupe is not None:  # the fast path dropped chains (else this would test the literal path twice)
        assert len(h.candidates) < 30 * 4
    assert h.mode == d.mode == ("pure-is" if dedupe is None else "reference-mask") and h.similarity == d.similarity
    assert h.candidate == d.candidate and (h.mask == d.mask).all() and (h.low_res_logits == d.low_res_logits).all()
    assert np.array_equal(h.candidate_logits, d.candidate_logits)
    assert bb.encoder_calls == 1 and calls["host"] == calls["device"] == 8
    assert moved["device"][".cpu()"] == 4 + 1 + 1 and moved["device"][".tolist()"] == 0
    assert moved["device"]["scalar reads"] == 0  # no "done yet?" inside a step: bounded, flagged
    assert moved["device"]["copies to the CPU"] == (6 if bb.device.type == "cuda" else 0)
    if dedupe is None:  # a plain pure-IS click (chains of 1, cheaper): one read per stage and the answer's
        agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=1), chain_clicks="device", dedupe_iou=None)
        agent.set_image(grabcut_image)
        with host_transfers() as plain:
            agent.predict((260, 170))
        assert plain[".cpu()"] == 2 + 1 and plain["copies to the CPU"] == (3 if bb.device.type == "cuda" else 0)
    with pytest.raises(ValueError, match="chain_clicks"):
        SmartSAMAgent(bb, chain_clicks="gpu")


@pytest.mark.slow  # model work over many rows: make test, not the inner loop
def test_bounds_too_tight_place_again_unbounded_with_the_same_answer(grabcut_image, monkeypatch):
    """With one round of labelling and a one-column distance window, the flags send every
    step's placement again, unbounded (it reads the device as it goes): the candidates and the
    mask are still the host path's."""
    bb = load_backbone("sam2.1_hiera_tiny-random", device="cpu")
    out, moved = {}, {}
    for where in ("host", "device"):
        agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=2), chain_clicks=where, dedupe_iou=None)
        agent.set_image(grabcut_image)
        with monkeypatch.context() as m, host_transfers() as moved[where]:
            m.setattr(cc, "LABEL_ROUNDS", 1)
            m.setattr(cc, "DISTANCE_WINDOW", 1)
            out[where] = agent.predict((240, 160), return_candidates=True)
    h, d = out["host"], out["device"]
    assert [(c.clicks, c.score) for c in h.candidates] == [(c.clicks, c.score) for c in d.candidates]
    assert max(c.chain_step for c in d.candidates) == 2 and (h.mask == d.mask).all()
    assert moved["device"]["scalar reads"] > 0 and moved["device"][".cpu()"] == 3 + 2 + 1 + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_the_device_twins_of_the_mask_maths_give_numpy_s_numbers(seed, device):
    """The band (NumPy's float32 percentile, step for step), the IoU between masks and the click
    test on the device equal :mod:`smartsam.masks`' NumPy functions exactly, at sizes from a few
    pixels to an image's 30 initial masks, with ties."""
    rng = np.random.default_rng(seed)
    frame = LowResFrame(image_hw=(300, 500), valid_hw=(154, 256), scale_xy=(500 / 256, 300 / 256))
    # 75 % of 3 values and 99 % of 7320 interpolate from the upper neighbour (weight >= 0.5)
    for size, fixed in [((1, 1, 3), 75.0), ((2, 7, 5), 50.0), ((3, 40, 61), 99.0), ((30, 154, 256), 90.0)]:
        x = (rng.standard_normal(size) * rng.uniform(0.5, 20)).astype(np.float32)
        if rng.random() < 0.5:
            x = np.round(x)  # many equal values
        for fraction, pct in [(0.25, fixed), (float(rng.uniform(0.01, 1)), float(rng.uniform(1, 100)))]:
            band = device_masks.uncertainty_band(torch.as_tensor(x, device=device), fraction, pct)
            assert float(band) == uncertainty_band(x, fraction, pct)
        m = x > 0.3
        assert np.array_equal(device_masks.batch_iou(torch.as_tensor(m, device=device)).cpu().numpy(), batch_iou(m, m))
    x[0, 0, 0] = np.nan  # NumPy's percentile is NaN then (no pixel is uncertain: the chains end)
    assert np.isnan(float(device_masks.uncertainty_band(torch.as_tensor(x, device=device)))) and np.isnan(uncertainty_band(x))
    with pytest.raises(ValueError, match="Percentiles"):
        device_masks.uncertainty_band(torch.as_tensor(x, device=device), 0.25, 101.0)
    logits = (rng.standard_normal((30, 256, 256)) * 8).astype(np.float32)
    t = torch.as_tensor(logits, device=device)
    for _ in range(50):
        click = (float(rng.uniform(0, 499)), float(rng.uniform(0, 299)))
        assert np.array_equal(device_masks.contains_click(t, frame, click).cpu().numpy(), contains_click(logits, frame, click))
