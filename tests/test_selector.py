import numpy as np
import pytest

from smartsam.features import pool_masks
from smartsam.selector import cosine
from smartsam.masks import LowResFrame
from smartsam.selector import Reference, contains_click, select_by_score, select_by_similarity

FRAME = LowResFrame(image_hw=(256, 256), valid_hw=(256, 256), scale_xy=(1.0, 1.0))


def test_pure_is_picks_the_best_score_among_masks_containing_the_click():
    lg = np.full((3, 256, 256), -5.0, np.float32)
    lg[0, 0:50, 0:50] = 5       # does not contain the click, best score
    lg[1, 90:140, 90:140] = 5   # contains it
    lg[2, 80:200, 80:200] = 5   # contains it, better score than 1
    inside = contains_click(lg, FRAME, (100.0, 100.0))
    assert inside.tolist() == [False, True, True]
    assert select_by_score(np.array([0.99, 0.5, 0.7]), inside) == 2
    # nobody contains the click: fall back to the best score overall
    assert select_by_score(np.array([0.99, 0.5, 0.7]), np.zeros(3, bool)) == 0


def test_reference_picks_the_most_similar_pooled_feature():
    # 4x4 patch grid: left half "red" features, right half "blue"
    tokens = np.zeros((4, 4, 2), np.float32)
    tokens[:, :2] = [1, 0]
    tokens[:, 2:] = [0, 1]
    masks = np.zeros((3, 64, 64), bool)
    masks[0, :, :32] = True          # all red
    masks[1, :, 32:] = True          # all blue
    masks[2, :, 16:48] = True        # half and half
    feats = pool_masks(tokens, masks)
    assert np.allclose(feats[0], [1, 0]) and np.allclose(feats[1], [0, 1]) and np.allclose(feats[2], [0.5, 0.5])
    ref = Reference("mask", [0.1, 1.0], "toy")
    idx, sims = select_by_similarity(feats, ref.feature, np.ones(3, bool))
    assert idx == 1
    assert sims == pytest.approx(cosine(feats, ref.feature))
    # restricted to candidates containing the click, the best allowed one wins
    idx, _ = select_by_similarity(feats, ref.feature, np.array([True, False, True]))
    assert idx == 2


def test_empty_mask_pools_to_zero_and_bad_references_are_refused():
    tokens = np.ones((4, 4, 3), np.float32)
    assert not pool_masks(tokens, np.zeros((1, 8, 8), bool)).any()
    with pytest.raises(ValueError):
        Reference("mask", np.zeros(3), "toy")
    with pytest.raises(ValueError):
        Reference("mask", [np.nan, 1, 1], "toy")
    with pytest.raises(ValueError):
        Reference("video", [1, 1, 1], "toy")


def test_several_exemplars_score_the_best_similarity_to_any():
    from smartsam.selector import cosine

    a, b = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    ref = Reference("mask", np.stack([a, b]), "x")
    assert ref.exemplars == 2 and ref.feature.shape == (2, 4)
    assert Reference("mask", a[None], "x").exemplars == 1  # (1, D) is one exemplar, as (D,)
    feats = np.array([[0, 0, 1.0, 0], [0, 0.9, 0.1, 0], [0.2, 0, 0, 1.0]])
    assert np.allclose(cosine(feats, ref.feature), np.maximum(cosine(feats, a), cosine(feats, b)))
    idx, _ = select_by_similarity(feats, ref.feature, np.ones(3, bool))
    assert idx == 1  # close to the second exemplar only
    with pytest.raises(ValueError):
        Reference("mask", np.stack([a, np.zeros(4)]), "x")  # an empty exemplar is refused
