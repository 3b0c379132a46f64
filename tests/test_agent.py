"""Both adapters end to end on a real image, with the real architectures (random weights).

Random weights show sizes, modes, call counts and reproducibility, never quality."""

import numpy as np
import pytest
import torch
from decoder_helpers import decode_every_way

from smartsam.agent import InvalidClick, SmartSAMAgent
from smartsam.backbones.base import Prompt


@pytest.mark.parametrize("which", ["sam2_backbone", "sam_backbone"])
def test_adapter_decodes_batches_and_caches_embeddings(which, request, grabcut_image):
    bb = request.getfixturevalue(which)
    bb.set_image(grabcut_image)
    enc = bb.encoder_calls
    bb.set_image(grabcut_image.copy())  # same pixels: no new encoder call
    assert bb.encoder_calls == enc
    dec = bb.decoder_calls
    prompts = [Prompt([[100, 100]], [1]) for _ in range(4)] + [Prompt(box=[20, 30, 200, 250]) for _ in range(3)]
    out = bb.predict(prompts, multimask=True)
    assert out.low_res_logits.shape == (7, 3, 256, 256) and out.scores.shape == (7, 3)
    assert bb.decoder_calls - dec == 2  # one call per prompt kind, not one per prompt
    chained = [Prompt([[100, 100], [150, 120]], [1, 0], mask_input=out.low_res_logits[i, 0]) for i in range(4)]
    out2 = bb.predict(chained, multimask=False)
    assert out2.low_res_logits.shape == (4, 1, 256, 256)
    full = bb.upsample(out2.low_res_logits[:, 0])
    assert full.shape == (4,) + grabcut_image.shape[:2]
    # batched decoding gives what one-by-one decoding gives: the same numbers in fp32; under the
    # CPU's bf16 autocast (where the CPU has it) rounding differs, the mask does not
    bf16 = bb.cpu_bf16
    try:
        bb.cpu_bf16 = False
        batch = bb.predict(chained, multimask=False)
        single = bb.predict([chained[2]], multimask=False)
        assert np.allclose(single.low_res_logits[0], batch.low_res_logits[2], atol=1e-3)
        bb.cpu_bf16 = True
        batch = bb.predict(chained, multimask=False)
        single = bb.predict([chained[2]], multimask=False)
        assert ((single.low_res_logits[0] > 0) == (batch.low_res_logits[2] > 0)).mean() > 0.99
    finally:
        bb.cpu_bf16 = bf16


@pytest.mark.parametrize("which", ["sam2_backbone", "sam_backbone"])
def test_the_shared_decoder_gives_the_library_decoders_outputs(which, request, grabcut_image, monkeypatch):
    """The shared decoder (image work done once per image) against the library's own MaskDecoder
    (sam2's for SAM 2.1, segment_anything's for SAM): the same numbers in fp32 for every prompt
    kind, the same masks in bf16; SMARTSAM_SHARED_DECODER picks it."""
    from smartsam.backbones.shared_decoder import shared_decoder_setting

    bb = request.getfixturevalue(which)
    bb.set_image(grabcut_image)
    rng = np.random.default_rng(5)
    h, w = grabcut_image.shape[:2]
    calls = []
    module = bb.model.sam_mask_decoder if which == "sam2_backbone" else bb.model.mask_decoder
    hook = module.register_forward_hook(lambda *a: calls.append(1))
    shared0, bf0 = bb.shared_decoder, bb.cpu_bf16
    try:
        for box, with_mask in [(False, False), (True, False), (False, True), (True, True)]:
            prompts = []
            for i in range(3):
                pts = rng.uniform([0, 0], [w - 1, h - 1], size=(1 + i, 2))
                prompts.append(Prompt(pts, [1] + [0] * i, box=[40 + i, 30, 300, 260] if box else None,
                                      mask_input=rng.normal(0, 8, (256, 256)).astype(np.float32) if with_mask else None))
            for multimask in (True, False):
                out = decode_every_way(bb, prompts, multimask, calls)
                ref = out[False, False]
                assert out[True, False].low_res_logits.shape == ref.low_res_logits.shape
                assert np.allclose(out[True, False].low_res_logits, ref.low_res_logits, atol=1e-3)
                assert np.allclose(out[True, False].scores, ref.scores, atol=1e-4)
                # bf16 on a CPU: the image-to-token attention by few_key_attention
                assert bb.shared.eager(torch.bfloat16).few_keys is True
                assert ((out[True, True].low_res_logits > 0) == (ref.low_res_logits > 0)).mean() > 0.98
                fp32 = bb.shared.eager(torch.float32)
                assert fp32.few_keys is False
                bb.shared_decoder, bb.cpu_bf16, fp32.few_keys = True, False, True  # the same in fp32
                try:
                    few = bb.predict(prompts, multimask)
                finally:
                    fp32.few_keys = False
                assert np.allclose(few.low_res_logits, ref.low_res_logits, atol=1e-3)
                assert np.allclose(few.scores, ref.scores, atol=1e-4)
    finally:
        hook.remove()
        bb.shared_decoder, bb.cpu_bf16 = shared0, bf0
    for value, expected in [(None, True), ("on", True), ("OFF", False), (False, False)]:
        assert shared_decoder_setting(value) is expected
    from smartsam.models import load_backbone

    # a constructor argument, never read from the environment by the library
    monkeypatch.setenv("SMARTSAM_SHARED_DECODER", "off")
    name = "sam2.1_hiera_tiny-random" if which == "sam2_backbone" else "sam_vit_tiny-random"
    assert load_backbone(name, device="cpu").shared_decoder is True
    assert load_backbone(name, device="cpu", shared_decoder="off").shared_decoder is False
    with pytest.raises(ValueError, match="SMARTSAM_SHARED_DECODER"):
        shared_decoder_setting("auto")


@pytest.mark.parametrize("keys", [1, 7, 11])
def test_few_key_attention_is_sdpa(keys):
    """few_key_attention against PyTorch's SDPA on the same projections, heads split as SAM
    splits them: fp32 to float rounding; bf16 within twice SDPA's own bf16 error (its scores are
    rounded to bf16 once more, before the softmax)."""
    import torch.nn.functional as F

    from smartsam.backbones.shared_decoder import few_key_attention

    torch.manual_seed(keys)
    b, n, heads, d = 2, 300, 8, 16
    q, k, v = torch.randn(b, n, heads * d) * 2, torch.randn(b, keys, heads * d) * 2, torch.randn(b, keys, heads * d)

    def sdpa(q, k, v):
        split = [x.unflatten(-1, (heads, d)).transpose(1, 2) for x in (q, k, v)]
        return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2)

    want = sdpa(q, k, v)
    got = few_key_attention(q, k, v, heads)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    half = [x.bfloat16() for x in (q, k, v)]
    got16, sdpa16 = few_key_attention(*half, heads), sdpa(*half)
    assert got16.dtype == torch.bfloat16
    assert (got16.float() - want).abs().mean() < 2 * (sdpa16.float() - want).abs().mean()


@pytest.mark.parametrize("which", ["sam2_backbone", "sam_backbone"])
def test_an_image_encoded_again_under_its_key_gets_a_new_share(which, request, grabcut_image):
    """The shared decoder's per-image share belongs to the embedding it came from: an image
    evicted and encoded again under the same key with other pixels is decoded from its own
    share (the library module's numbers), not the first image's."""
    bb = request.getfixturevalue(which)
    size0, shared0, bf0 = bb.cache_size, bb.shared_decoder, bb.cpu_bf16
    other = np.ascontiguousarray(grabcut_image[::-1])
    prompts = [Prompt(np.array([[200.0, 150.0]]), [1])]
    try:
        bb.cache_size, bb.cpu_bf16 = 1, False
        bb._cache.clear()
        bb.set_image(grabcut_image, key="photo")
        bb.predict(prompts, True)
        bb.set_image(other, key="elsewhere")  # evicts "photo"
        bb.set_image(other, key="photo")  # the same key, other pixels
        got = bb.predict(prompts, True)
        bb.shared_decoder = False
        want = bb.predict(prompts, True)
        assert np.allclose(got.low_res_logits, want.low_res_logits, atol=1e-3)
    finally:
        bb.cache_size, bb.shared_decoder, bb.cpu_bf16 = size0, shared0, bf0
        bb._cache.clear()


@pytest.mark.parametrize("which", ["sam2_backbone", "sam_backbone"])
def test_agent_one_click_end_to_end(which, request, grabcut_image):
    bb = request.getfixturevalue(which)
    agent = SmartSAMAgent(bb, dedupe_iou=None)
    enc = bb.encoder_calls
    bb._cache.clear()
    agent.set_image(grabcut_image)
    assert bb.encoder_calls == enc + 1
    res = agent.predict((240, 160), return_candidates=True)
    assert res.mask.shape == grabcut_image.shape[:2] and res.mask.dtype == bool
    assert res.mode == "pure-is" and res.similarity is None
    assert len([c for c in res.candidates if c.chain_step == 0]) == 30
    assert len(res.candidates) <= 30 + 90 and res.candidate_logits.shape[0] == len(res.candidates)
    assert all(c.chain_step <= 3 for c in res.candidates)
    # decoder calls: 2 prompt kinds x (1 initial + 3 chain steps), never one per chain
    assert res.calls["decoder"] == 8 and res.calls["encoder"] == 0
    # the chosen mask is one of the candidates, with its score
    i = res.candidates.index(res.candidate)
    assert res.score == pytest.approx(float(res.candidate_scores[i]))
    # chains: every refined candidate's clicks are Add (1) or Cut (0) inside the image
    h, w = grabcut_image.shape[:2]
    for c in res.candidates:
        assert len(c.clicks) == c.chain_step
        for (x, y), label in c.clicks:
            assert label in (0, 1) and 0 <= x <= w - 1 and 0 <= y <= h - 1


def test_agent_is_reproducible_and_seeded(sam2_backbone, grabcut_image):
    a = SmartSAMAgent(sam2_backbone, seed=3)
    a.set_image(grabcut_image)
    r1 = a.predict((200, 150), return_candidates=True)
    b = SmartSAMAgent(sam2_backbone, seed=3)
    b.set_image(grabcut_image)
    r2 = b.predict((200, 150), return_candidates=True)
    assert np.array_equal(r1.mask, r2.mask)
    assert [c.clicks for c in r1.candidates] == [c.clicks for c in r2.candidates]


@pytest.mark.parametrize("which", ["sam2_backbone", "sam_backbone"])
def test_default_path_is_literal_where_measured_within_target(which, request):
    """auto: the paper's literal agent on a CPU with bf16 and the shared decoder (measured 1.5 s
    per click with SAM 2.1, 2.4 s with SAM ViT-B), the fast path on other CPU configurations
    (measured over 2.5 s literal)."""
    bb = request.getfixturevalue(which)
    bf0, sh0 = bb.cpu_bf16, bb.shared_decoder
    try:
        for bf16, shared, path in [(True, True, "literal"), (False, True, "fast"), (True, False, "fast")]:
            bb.cpu_bf16, bb.shared_decoder = bf16, shared
            assert SmartSAMAgent(bb).path == path
            assert SmartSAMAgent(bb, dedupe_iou=None).path == "literal"
    finally:
        bb.cpu_bf16, bb.shared_decoder = bf0, sh0


def test_fast_path_skips_duplicate_chains(sam2_backbone, grabcut_image):
    """At the shipped threshold (FAST_PATH_IOU) the fast path starts no chain from an initial
    mask that a better-scored one nearly repeats: fewer chains than the literal path's 30, from the
    same 30 initial masks, and each chain it runs starts with the literal path's first click (every
    chain draws from its own stream)."""
    from smartsam.agent import FAST_PATH_IOU

    literal = SmartSAMAgent(sam2_backbone, dedupe_iou=None)
    fast = SmartSAMAgent(sam2_backbone, dedupe_iou=FAST_PATH_IOU)
    literal.set_image(grabcut_image)
    fast.set_image(grabcut_image)
    rl = literal.predict((240, 160), return_candidates=True)
    rf = fast.predict((240, 160), return_candidates=True)
    lit, fst = ({(c.prompt_index, c.mask_index): c for c in r.candidates if c.chain_step == 1} for r in (rl, rf))
    assert len(lit) == 30 and 0 < len(fst) < 30 and len(rf.candidates) < len(rl.candidates)
    assert np.allclose(rf.candidate_logits[:30], rl.candidate_logits[:30])
    for chain, c in fst.items():
        assert c.clicks == lit[chain].clicks


def test_reference_modes(sam2_backbone, dino, clip, grabcut_image, coco_image):
    agent = SmartSAMAgent(sam2_backbone, image_features=dino, text_features=clip)
    ref_mask = np.zeros(coco_image.shape[:2], bool)
    ref_mask[100:300, 100:400] = True
    refs = {
        "reference-mask": agent.reference_from_mask(coco_image, ref_mask),
        "reference-image": agent.reference_from_image(coco_image),
        "reference-text": agent.reference_from_text("penguin"),
    }
    agent.set_image(grabcut_image)
    dino._cache.clear()  # the session's extractor may hold this image's tokens from another test
    calls = dino.forward_calls
    for mode, ref in refs.items():
        res = agent.predict((240, 160), reference=ref, return_candidates=True)
        assert res.mode == mode
        assert -1.0 <= res.similarity <= 1.0
        assert res.mask.shape == grabcut_image.shape[:2]
    # the target image's patch tokens were computed once for both image references
    assert dino.forward_calls - calls == 1
    with pytest.raises(ValueError):
        agent.reference_from_mask(coco_image, np.zeros(coco_image.shape[:2], bool))
    with pytest.raises(ValueError):
        agent.reference_from_text("   ")


def test_outer_interactions_refine_the_answer(sam2_backbone, grabcut_image):
    agent = SmartSAMAgent(sam2_backbone)
    agent.set_image(grabcut_image)
    first = agent.predict((240, 160))
    dec = sam2_backbone.decoder_calls
    r = agent.refine([(240, 160), (30, 30)], [1, 0], first)
    assert r.mode == "refine" and r.mask.shape == grabcut_image.shape[:2]
    assert sam2_backbone.decoder_calls - dec == 1
    # without the previous answer it is recomputed from the first positive click (cached here)
    r2 = agent.refine([(240, 160), (30, 30)], [1, 0])
    assert np.array_equal(r.mask, r2.mask)


@pytest.mark.parametrize("click", [(-1, 5), (5, 10_000), (float("nan"), 3), ("a", 2), (1,)])
def test_bad_clicks_are_refused(sam2_backbone, grabcut_image, click):
    agent = SmartSAMAgent(sam2_backbone)
    agent.set_image(grabcut_image)
    with pytest.raises(InvalidClick):
        agent.predict(click)


def test_negative_only_refinement_is_refused(sam2_backbone, grabcut_image):
    agent = SmartSAMAgent(sam2_backbone)
    agent.set_image(grabcut_image)
    with pytest.raises(InvalidClick):
        agent.refine([(10, 10)], [0])


def test_embedding_cache_is_bounded(grabcut_image):
    from smartsam.models import load_backbone

    bb = load_backbone("sam_vit_tiny-random", cache_size=2, device="cpu")
    imgs = [np.ascontiguousarray(np.roll(grabcut_image, k, axis=1)) for k in range(3)]
    for im in imgs:
        bb.set_image(im)
    assert len(bb._cache) == 2 and bb.encoder_calls == 3
    bb.set_image(imgs[0])  # evicted: encoded again
    assert bb.encoder_calls == 4


def test_a_deadline_cuts_the_chains_and_says_so(sam2_backbone, grabcut_image):
    import time

    from smartsam.agent import SmartSAMAgent

    agent = SmartSAMAgent(sam2_backbone, seed=0)
    agent.set_image(grabcut_image)
    calls = sam2_backbone.decoder_calls
    cut = agent.predict((240, 176), deadline=time.monotonic())  # already past: no chain step runs
    assert cut.partial and cut.candidate.chain_step == 0 and cut.mask.shape == grabcut_image.shape[:2]
    assert sam2_backbone.decoder_calls - calls <= 2  # the initial prompts only (points, boxes)
    full = agent.predict((240, 176))
    assert not full.partial  # a cut answer is not cached in place of the full one
    assert full.calls["decoder"] > cut.calls["decoder"]


def test_a_chain_step_that_would_end_past_the_deadline_does_not_start(sam2_backbone, grabcut_image):
    """The caller stops waiting at the deadline, so a chain step started before it but ending after
    it would turn the partial answer into none: with less time left than the explore stage took
    per row times the chains, the job ends at once, partial, with the explored candidates."""
    import time

    from smartsam.agent import SmartSAMAgent
    from smartsam.batch import BatchEngine

    agent = SmartSAMAgent(sam2_backbone, seed=0)
    agent.set_image(grabcut_image)
    job = agent.job(grabcut_image, (240, 176), return_candidates=True)
    engine = BatchEngine(sam2_backbone)
    engine.add(job)
    t0 = time.monotonic()
    assert engine.step().finished == []  # the explore stage: 10 prompts, 3 masks each
    explore = time.monotonic() - t0
    job.deadline = time.monotonic() + explore / 2  # time left, but less than a chain step needs
    calls = sam2_backbone.decoder_calls
    finished = engine.step().finished
    assert [j for j, _ in finished] == [job], "a chain step started that would end past the deadline"
    res = finished[0][1]
    assert res.partial and max(c.chain_step for c in res.candidates) == 0 and len(res.candidates) == 30
    assert sam2_backbone.decoder_calls == calls


def test_reference_preparation_crops_the_object_to_70_percent_without_background(dino, coco_image, datasets):
    from smartsam.eval.datasets import load_gt, load_dataset
    from smartsam.masks import BACKGROUND_FILL, mask_box, prepare_reference

    sample = next(s for s in load_dataset(datasets / "COCO_MVal-dev") if s.name.startswith("airplane00_"))
    gt = load_gt(sample)[0]
    img, m = prepare_reference(coco_image, gt)
    x0, y0, x1, y1 = mask_box(m)
    assert (x1 - x0) * (y1 - y0) / m.size == pytest.approx(0.7, abs=0.03)  # the object's box: ~70 %
    assert m.sum() == gt.sum()  # the whole object, nothing else
    assert (img[~m] == BACKGROUND_FILL).all()  # background removed
    assert (img[m] == coco_image[gt]).all()  # a crop is a shift: the object's pixels, in the same order
    # references pool the prepared image by default (the paper), the raw one with "none"
    from smartsam.features import FeatureSet
    from smartsam.reference import ReferenceBuilder

    paper = ReferenceBuilder(FeatureSet(dino)).from_mask(coco_image, gt)
    raw = ReferenceBuilder(FeatureSet(dino), reference_prep="none").from_mask(coco_image, gt)
    assert np.allclose(paper.feature, dino.mask_features(img, m[None])[0], atol=1e-5)
    assert np.allclose(raw.feature, dino.mask_features(coco_image, gt[None])[0], atol=1e-5)
    assert not np.allclose(paper.feature, raw.feature)
    with pytest.raises(ValueError):
        ReferenceBuilder(FeatureSet(dino), reference_prep="crop")
    with pytest.raises(ValueError, match="backbone"):
        SmartSAMAgent(None, image_features=dino)
