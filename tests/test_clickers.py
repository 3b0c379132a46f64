import numpy as np
import pytest

from smartsam.clickers import ADD, CUT, NextChainClicker
from smartsam.masks import LowResFrame, region_center, uncertainty_band

FRAME = LowResFrame(image_hw=(256, 256), valid_hw=(256, 256), scale_xy=(1.0, 1.0))


def logit_map():
    """Confident object (+10) in a square, confident background (-10), with two uncertain patches:
    a weakly positive one inside the mask and a weakly negative one outside it."""
    lg = np.full((256, 256), -10.0, np.float32)
    lg[40:200, 40:200] = 10.0
    lg[60:100, 60:140] = 0.5     # inside the mask, uncertain: rows 60-99, cols 60-139
    lg[220:250, 20:60] = -0.5    # outside the mask, uncertain: rows 220-249, cols 20-59
    lg[5:8, 5:8] = -0.4          # a smaller uncertain patch outside
    return lg


def test_band_comes_from_the_images_own_logits():
    lg = logit_map()
    assert uncertainty_band(lg, 0.25, 90) == pytest.approx(2.5)
    # the same shapes at another logit scale give a proportional band
    assert uncertainty_band(lg * 3, 0.25, 90) == pytest.approx(7.5)


def test_cut_goes_inside_to_the_middle_of_the_uncertain_region():
    c = NextChainClicker()
    lg = logit_map()
    band = c.band(lg[None], FRAME)
    x, y = c.place(lg, CUT, band, FRAME)
    assert lg[int(y), int(x)] > 0 and abs(lg[int(y), int(x)]) < band
    # middle of the 40x80 patch: row 79.5 +- 0.5, and in the central columns
    assert 79 <= y <= 80 and 79 <= x <= 120


def test_add_goes_outside_to_the_largest_uncertain_region():
    c = NextChainClicker()
    lg = logit_map()
    band = c.band(lg[None], FRAME)
    x, y = c.place(lg, ADD, band, FRAME)
    assert lg[int(y), int(x)] < 0 and abs(lg[int(y), int(x)]) < band
    assert 220 <= y < 250 and 20 <= x < 60  # the larger patch, not the 3x3 one
    assert (x, y) == region_center(lg[None, ...][0] == -0.5)


def test_no_uncertain_pixels_on_that_side_ends_the_chain():
    c = NextChainClicker()
    lg = np.where(np.arange(256)[None, :] < 128, 10.0, -10.0).repeat(256, 0).astype(np.float32)
    assert c.place(lg, CUT, 1.0, FRAME) is None
    assert c.place(lg, ADD, 1.0, FRAME) is None


def test_sign_is_bernoulli_of_the_score():
    c = NextChainClicker()
    lg = logit_map()
    band = c.band(lg[None], FRAME)
    rng = np.random.default_rng(0)
    cuts = sum(c.next_click(lg, 0.8, band, FRAME, rng).label == CUT for _ in range(4000))
    assert cuts / 4000 == pytest.approx(0.8, abs=0.03)
    assert all(c.next_click(lg, 1.0, band, FRAME, rng).label == CUT for _ in range(50))
    assert all(c.next_click(lg, 0.0, band, FRAME, rng).label == ADD for _ in range(50))


def test_low_res_clicks_map_back_to_image_pixels():
    # SAM pads: a 480x640 image fills 192x256 of the grid, 2.5 image px per low-res px
    frame = LowResFrame(image_hw=(480, 640), valid_hw=(192, 256), scale_xy=(2.5, 2.5))
    lg = np.full((256, 256), -10.0, np.float32)
    lg[100:110, 200:210] = -0.1
    lg[192:, :] = 0.0  # padding: must never be clicked
    x, y = NextChainClicker().place(lg, ADD, 1.0, frame)
    assert 200 * 2.5 <= x <= 210 * 2.5 and 100 * 2.5 <= y <= 110 * 2.5
