import numpy as np
import pytest

from smartsam.sampler import PrioriInitialSampler


def test_ten_prompts_in_order():
    s = PrioriInitialSampler()
    prompts = s.sample((300.0, 200.0), (480, 640), np.random.default_rng(0))
    assert [p.kind for p in prompts] == ["click"] + ["point"] * 6 + ["box"] * 3
    assert np.allclose(prompts[0].prompt.points, [[300, 200]])
    assert all(p.prompt.labels.tolist() == [1] for p in prompts[:7])
    assert all(p.prompt.box is not None and len(p.prompt.points) == 0 for p in prompts[7:])


def test_point_distances_follow_beta_gamma():
    s = PrioriInitialSampler(num_points=200_000, beta=100.0)
    # a click in the middle of a huge image: clipping never happens
    pts = s.sample_points((50_000.0, 50_000.0), (100_000, 100_000), np.random.default_rng(1))
    d = np.hypot(pts[:, 0] - 50_000, pts[:, 1] - 50_000)
    assert d.mean() == pytest.approx(200.0, rel=0.02)  # mean of beta * Gamma(2, 1) is 2 * beta
    hist, edges = np.histogram(d, bins=np.arange(0, 1000, 20))
    mode = edges[np.argmax(hist)] + 10
    assert 60 <= mode <= 140  # the mode is beta * (2 - 1) = 100 px
    ang = np.arctan2(pts[:, 1] - 50_000, pts[:, 0] - 50_000)
    counts, _ = np.histogram(ang, bins=8, range=(-np.pi, np.pi))
    assert counts.min() / counts.max() > 0.95  # uniform angle


def test_boxes_aspect_size_and_centres_by_eq1():
    s = PrioriInitialSampler()
    rng = np.random.default_rng(2)
    sides, centres = [], []
    for _ in range(2000):
        boxes = s.sample_boxes((5000.0, 5000.0), (10240, 10240), rng)  # scale 10: no clipping
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        assert np.allclose(w / h, [0.67, 1.0, 1.5], rtol=1e-3)
        sides.extend(np.maximum(w, h) / 10.0)
        centres.extend(np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1) - 5000)
    sides = np.asarray(sides)
    assert sides.min() >= 200 - 1e-3 and sides.max() <= 800 + 1e-3
    assert sides.min() < 260 and sides.max() > 740  # uniform over the whole range
    # centres: distance / beta ~ Gamma(2, 1) (Kolmogorov-Smirnov against its CDF), uniform angle
    c = np.asarray(centres)
    d = np.sort(np.hypot(c[:, 0], c[:, 1]) / 100.0)
    cdf = 1 - np.exp(-d) * (1 + d)
    n = len(d)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 0.03, ks  # 6000 draws: about 0.018 at the 5 % level; a centred box gives 1.0
    counts, _ = np.histogram(np.arctan2(c[:, 1], c[:, 0]), bins=8, range=(-np.pi, np.pi))
    assert counts.min() / counts.max() > 0.8, counts


def test_everything_is_clipped_to_the_image():
    s = PrioriInitialSampler(beta=400.0)
    rng = np.random.default_rng(3)
    for _ in range(50):
        prompts = s.sample((2.0, 3.0), (120, 90), rng)
        for p in prompts:
            if p.prompt.box is not None:
                x0, y0, x1, y1 = p.prompt.box
                assert 0 <= x0 <= x1 <= 89 and 0 <= y0 <= y1 <= 119
            else:
                assert (p.prompt.points >= 0).all()
                assert (p.prompt.points[:, 0] <= 89).all() and (p.prompt.points[:, 1] <= 119).all()


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError):
        PrioriInitialSampler(beta=0)
    with pytest.raises(ValueError):
        PrioriInitialSampler(box_side_range=(800, 200))
