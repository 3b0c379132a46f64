"""SAM 3 (transformers' Sam3TrackerModel, with its concept detector) and HQ-SAM (SamHQModel):
the real designs with small random configurations, through the Backbone interface, every agent
path and the evaluation harness. Random weights show shapes, modes and call counts only."""

import json

import numpy as np
import pytest

from cli_helpers import run_cli
from decoder_helpers import decode_every_way
from smartsam.backbones.base import Prompt

NAMES = ["sam3-tiny-random", "sam_hq_vit_tiny-random"]


@pytest.fixture(scope="module", params=NAMES)
def backbone(request):
    from smartsam.models import load_backbone

    return load_backbone(request.param, device="cpu")


def test_backbone_interface(backbone, coco_image):
    img = coco_image
    h, w = img.shape[:2]
    backbone.set_image(img)
    backbone.set_image(img.copy())  # same pixels: the cached embedding
    assert backbone.encoder_calls == 1
    g = backbone.grid
    assert g == (288 if backbone.name.startswith("sam3") else 256)
    prompts = [Prompt([[w / 2, h / 2]], [1]), Prompt([[w / 3, h / 3], [w / 2, h / 2]], [1, 0]), Prompt([[10, 10]], [1]),
               Prompt(box=[w / 4, h / 4, w / 2, h / 2]), Prompt([[w / 3, h / 3]], [1], box=[w / 4, h / 4, w / 2, h / 2])]
    calls = backbone.decoder_calls
    res = backbone.predict(prompts, multimask=True)
    assert res.low_res_logits.shape == (5, 3, g, g) and res.scores.shape == (5, 3)
    assert backbone.decoder_calls - calls == 2  # one per prompt kind: points; boxes (with or without points)
    assert np.isfinite(res.low_res_logits).all() and res.frame.grid == g
    # the low-res logits go back in as mask_input, each prompt with its own
    fed = backbone.predict([Prompt([[w / 2, h / 2]], [1], mask_input=res.low_res_logits[0, 0]),
                            Prompt([[w / 3, h / 3]], [0], mask_input=res.low_res_logits[1, 2])], multimask=False)
    assert fed.low_res_logits.shape == (2, 1, g, g)
    one = backbone.predict([Prompt([[w / 3, h / 3]], [0], mask_input=res.low_res_logits[1, 2])], multimask=False)
    assert np.allclose(one.low_res_logits[0], fed.low_res_logits[1], atol=1e-3)  # batched = one by one
    assert backbone.upsample(fed.low_res_logits[:, 0]).shape == (2, h, w)
    for shared in (True, False):  # no point and no box: a clear error either way
        backbone.shared_decoder = shared
        with pytest.raises(ValueError, match="a point labelled 0 or 1, or a box"):
            backbone.predict([Prompt([[10, 10]], [-1])], multimask=True)
    backbone.shared_decoder = True
    with pytest.raises(ValueError, match=f"takes \\({g}, {g}\\)"):
        backbone.predict([Prompt([[5, 5]], [1], mask_input=np.zeros((g + 1, g + 1), np.float32))], multimask=False)


def test_every_agent_path(backbone, coco_image, dino, clip):
    from smartsam.agent import SmartSAMAgent
    from smartsam.clickers import NextChainClicker
    from smartsam.features import FeatureSet

    img = coco_image
    h, w = img.shape[:2]
    agent = SmartSAMAgent(backbone, clicker=NextChainClicker(chain_length=1), features=FeatureSet(dino, clip), seed=0)
    enc = backbone.encoder_calls
    agent.set_image(img)
    res = agent.predict((w / 2, h / 2), return_candidates=True)
    assert res.mode == "pure-is" and res.mask.shape == (h, w) and res.low_res_logits.shape == (backbone.grid,) * 2
    assert res.calls["decoder"] >= 2 and len(res.candidate_scores) >= 30
    assert res.candidate_logits.shape[1:] == (backbone.grid,) * 2
    again = agent.predict((w / 2, h / 2))
    assert np.array_equal(again.mask, res.mask)  # seeded
    ref = agent.reference_from_mask(img, res.mask | np.eye(h, w, dtype=bool))
    r = agent.predict((w / 3, h / 3), ref)
    assert r.mode.startswith("reference") and r.similarity is not None
    t = agent.predict((w / 3, h / 3), agent.reference_from_text("an airplane"))
    assert t.mode.startswith("reference") and t.similarity is not None
    fine = agent.refine([(w / 2, h / 2), (w / 4, h / 4)], [1, 0], res)
    assert fine.mask.shape == (h, w) and fine.calls["decoder"] == 1
    box = agent.predict_box((w / 4, h / 4, w / 2, h / 2))
    assert box.mask.shape == (h, w)
    plain = agent.predict_plain((w / 2, h / 2))
    assert plain.mask.shape == (h, w)
    assert backbone.encoder_calls - enc <= 1  # one encoding for every path on this image (0 if cached)


@pytest.mark.slow  # model work over many rows: make test, not the inner loop
def test_sam3_concepts_run_on_the_same_encoding(coco_image):
    from smartsam.agent import SmartSAMAgent
    from smartsam.clickers import NextChainClicker
    from smartsam.features import FeatureSet
    from smartsam.instances import InstanceFinder
    from smartsam.models import load_backbone, load_concept_proposer, load_features

    bb = load_backbone("sam3-tiny-random", device="cpu", concepts=True)
    assert bb.detector.vision_encoder.backbone is bb.model.vision_encoder.backbone  # one backbone in memory
    det = load_concept_proposer(bb, score_threshold=0.0, max_detections=3)
    img = coco_image
    h, w = img.shape[:2]
    agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=0), features=FeatureSet(load_features("dinov2-tiny-random")))
    agent.set_image(img)
    found = det.detect(boxes=[(w / 4, h / 4, w / 2, h / 2)])
    assert len(found) == 3 and all(d.mask.shape == (h, w) and d.mask[int(d.click[1]), int(d.click[0])] for d in found)
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    assert len(det.detect(text="airplane")) == 3
    ref = agent.reference_from_mask(img, found[0].mask)
    inst = InstanceFinder(agent, max_instances=2, threshold=-1.0, concepts=det, adaptive=False).find(img, ref, exclude=[found[0].mask])
    # random detections may all lie on the excluded object: what can be asserted is the path
    assert len(inst) <= 2 and all(i.source == "sam3" for i in inst)
    assert bb.encoder_calls == 1 and det.detector_calls == 3  # the detector read the tracker's encoding
    with pytest.raises(Exception, match="SAM 3"):
        load_concept_proposer(load_backbone("sam_hq_vit_tiny-random", device="cpu"))


@pytest.mark.parametrize("name", NAMES)
def test_eval_runs_on_them(tmp_path, datasets, name):
    for mode in ("backbone", "pure-is"):
        p = run_cli("eval", "--dataset", str(datasets / "GrabCut"), "--mode", mode, "--limit", "1", "--max-clicks", "2",
                    "--trials", "1", "--backbone", name, "--out", str(tmp_path), "--no-progress")
        assert p.returncode == 0, p.stderr[-2000:]
        s = json.loads((tmp_path / f"{mode}.json").read_text())
        assert s["segmenter"].endswith(name) and s["random_weights"] is True and s["n"] == 1


def test_prelabel_through_the_backend_on_sam3_with_concept_proposals(tmp_path, coco_image):
    """The backend's pre-labeling path on SAM 3 (small random variant) with SMARTSAM_PROPOSALS=sam3:
    one encoding, the detector prompted once, the answer names the proposals."""
    import base64
    import io

    from PIL import Image

    from backend.config import Settings
    from backend.server import Services

    s = Settings(backbone="sam3-tiny-random", data_dir=tmp_path, allow_data_urls=True, proposals="sam3",
                 instance_threshold="-1", max_instances=2, chain_length=0)
    sv = Services(s, load=False)
    sv.models.load()
    assert sv.models.load_error is None and sv.models.concepts is not None
    sv.models.concepts.score_threshold = 0.0  # random weights: keep every detection
    img = coco_image
    h, w = img.shape[:2]
    ref_mask = np.zeros((h, w), bool)
    ref_mask[h // 4: h // 2, w // 4: w // 2] = True
    sv.store.put("1", "Car", sv.models.make_reference(img, ref_mask), {"admin": "test"}, how="admin")
    b = io.BytesIO()
    Image.fromarray(img).save(b, format="PNG")
    task = {"id": 1, "data": {"image": "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()}}
    cfg = """<View><Image name="image" value="$image"/>
<KeyPointLabels name="tag" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>
<BrushLabels name="brush" toName="image"><Label value="Car"/></BrushLabels></View>"""
    model = sv.backend(cfg)
    preds = model.predict([task], project="1.1")
    # an image + mask reference from another image: the agent's answer at the best similarity peak is
    # the first instance (threshold -1 keeps it) and the exemplar box the detector is prompted with
    assert sv.models.backbone.encoder_calls == 1 and sv.models.concepts.detector_calls == 1
    [pred] = preds
    assert pred["mode"] == "prelabel" and pred["settings"]["proposals"] == "sam3" and "-propsam3" in pred["model_version"]
    assert 1 <= pred["instances"]["Car"] <= 2
    sv.close()


def _official_hq_decoder(hf_decoder, vit_dim: int):
    """SysCV's own ``MaskDecoderHQ`` (``segment-anything-hq``) holding transformers' weights: the
    HQ-SAM decoder as its authors wrote it, to hold ours against."""
    import re

    from segment_anything_hq.modeling.mask_decoder_hq import MaskDecoderHQ
    from segment_anything_hq.modeling.transformer import TwoWayTransformer

    cfg = hf_decoder.transformer.config
    dec = MaskDecoderHQ(transformer_dim=cfg.hidden_size, vit_dim=vit_dim, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
                        transformer=TwoWayTransformer(depth=cfg.num_hidden_layers, embedding_dim=cfg.hidden_size,
                                                      mlp_dim=cfg.mlp_dim, num_heads=cfg.num_attention_heads)).eval()
    renames = [  # transformers' names -> the official ones (the inverse of transformers' conversion)
        (r"layer_norm(\d)", r"norm\1"), (r"layer_norm_final_attn", "norm_final_attn"), (r"^hq_token", "hf_token"),
        (r"^hq_mask_mlp", "hf_mlp"), (r"\.proj_in\.", ".layers.0."), (r"\.proj_out\.", ".layers.2."),
        (r"^upscale_conv1", "output_upscaling.0"), (r"^upscale_layer_norm", "output_upscaling.1"),
        (r"^upscale_conv2", "output_upscaling.3"), (r"^compress_vit_conv1", "compress_vit_feat.0"),
        (r"^compress_vit_norm", "compress_vit_feat.1"), (r"^compress_vit_conv2", "compress_vit_feat.3"),
        (r"^encoder_conv1", "embedding_encoder.0"), (r"^encoder_norm", "embedding_encoder.1"),
        (r"^encoder_conv2", "embedding_encoder.3"), (r"^mask_conv1", "embedding_maskfeature.0"),
        (r"^mask_norm", "embedding_maskfeature.1"), (r"^mask_conv2", "embedding_maskfeature.3"),
    ]
    state = {}
    for k, v in hf_decoder.state_dict().items():
        if re.search(r"(mlps\.\d+|mlp|head)\.layers\.0\.", k):  # a 3-layer head's middle layer, before proj_out moves
            k = k.replace(".layers.0.", ".layers.1.")
        for a, b in renames:
            k = re.sub(a, b, k)
        state[k] = v
    dec.load_state_dict(state)
    for layer in dec.transformer.layers:  # transformers' blocks normalise with their config's eps (1e-6), SAM's with 1e-5
        for i in range(1, 5):
            getattr(layer, f"norm{i}").eps = cfg.layer_norm_eps
    return dec


def test_hq_sam_shared_decoder_is_the_official_hq_decoder(coco_image):
    """HQ-SAM's shared decoder (the image's share, HQ features included, once per image) against
    SysCV's MaskDecoderHQ with the same weights: the same masks and IoU in fp32 for every prompt
    kind (its multimask answer is the best-scored mask: ours are sorted, so our first). transformers'
    own SamHQMaskDecoder (5.25) gives the same IoU but other masks: it upscales the image embedding
    from before its transformer, transposed, where HQ-SAM upscales the transformer's output - why
    the shared decoder is the default for HQ-SAM too."""
    import torch

    from smartsam.models import load_backbone

    bb = load_backbone("sam_hq_vit_tiny-random", device="cpu", cpu_bf16="off")
    assert bb.shared_decoder is True
    with torch.no_grad():  # transformers leaves the random encoder's weights near 0 (an embedding of ~1e-20)
        torch.manual_seed(0)
        for p in bb.model.vision_encoder.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.05)
    img = coco_image
    h, w = img.shape[:2]
    bb.set_image(img)
    emb, inter, _, _ = bb._state
    assert emb.std() > 0.5
    official = _official_hq_decoder(bb.model.mask_decoder, vit_dim=inter[0].shape[-1])
    calls = []
    hook = bb.model.mask_decoder.register_forward_hook(lambda *a: calls.append(1))
    rng = np.random.default_rng(3)
    try:
        for box, with_mask in [(False, False), (True, False), (False, True), (True, True)]:
            # as many points in every row: a CPU decodes rows in chunks, each padded to its own longest
            prompts = [Prompt(rng.uniform([0, 0], [w - 1, h - 1], size=(2, 2)), [1, 0],
                              box=[w / 5 + i, h / 6, w / 2, h / 2] if box else None,
                              mask_input=rng.normal(0, 8, (256, 256)).astype(np.float32) if with_mask else None)
                       for i in range(3)]
            for multimask in (True, False):
                ours = bb.predict(prompts, multimask)
                assert not calls  # transformers' module never ran
                assert ours.low_res_logits.shape == (3, 3 if multimask else 1, 256, 256)
                points, labels, boxes, masks = bb._inputs(prompts)
                with torch.inference_mode():
                    sparse, dense = bb.model.prompt_encoder(points, labels, boxes, masks)
                    args = (emb, bb.model.get_image_wide_positional_embeddings(), sparse[:, 0],
                            dense.expand(len(prompts), -1, -1, -1))
                    best, best_iou = official(*args, multimask, False, inter)  # its answer: the best mask + HQ
                    hq = official.embedding_encoder(emb) + official.compress_vit_feat(inter[0].permute(0, 3, 1, 2))
                    every, every_iou = official.predict_masks(*args, hq_features=hq)  # SAM's 4 masks, HQ's
                if multimask:  # SAM's three, sorted by score as transformers sorts them, each plus HQ's
                    want_iou, order = torch.sort(every_iou[:, 1:4], dim=1, descending=True)
                    want = torch.gather(every[:, 1:4], 1, order[..., None, None].expand(-1, -1, 256, 256)) + every[:, 4:]
                else:
                    want, want_iou = every[:, :1] + every[:, 4:], every_iou[:, :1]
                # fp32; the official transformer's explicit softmax against SDPA
                assert np.allclose(ours.low_res_logits, want.numpy(), atol=1e-5)
                assert np.allclose(ours.scores, want_iou.numpy(), atol=1e-5)
                assert np.allclose(ours.low_res_logits[:, :1], best.numpy(), atol=1e-5)
                assert np.allclose(ours.scores[:, :1], best_iou.numpy(), atol=1e-5)
                if box and with_mask:  # the image-to-token attention by few_key_attention (bf16's, on a CPU)
                    dec = bb.shared.eager(torch.float32)
                    dec.few_keys = True
                    try:
                        few = bb.predict(prompts, multimask)
                    finally:
                        dec.few_keys = False
                    # this decoder's random logits are small: against SDPA's own, to its rounding
                    assert np.allclose(few.low_res_logits, ours.low_res_logits, atol=1e-6)
                    assert dec._heads(dec.decoder.transformer.layers[0].cross_attn_image_to_token) == 8
                if box and with_mask:  # transformers' module, once: its scores, not its masks
                    bb.shared_decoder = False
                    lib = bb.predict(prompts, multimask)
                    bb.shared_decoder = True
                    assert calls and np.allclose(lib.scores, ours.scores, atol=1e-5)
                    assert not np.allclose(lib.low_res_logits, ours.low_res_logits, atol=1e-3), \
                        "transformers' SamHQMaskDecoder now gives HQ-SAM's masks: make it the reference here"
                    calls.clear()
    finally:
        hook.remove()
        bb.shared_decoder = True
    # its literal click was never measured within the CPU target (8.4-13 s on 2 cores): the fast
    # path stays auto's choice on a CPU, bf16 hardware or not
    from smartsam.agent import SmartSAMAgent

    bb.cpu_bf16 = True
    assert SmartSAMAgent(bb).path == "fast"


def test_sam3_shared_decoder_is_transformers_decoder(coco_image):
    """SAM 3 tracker's shared decoder (the image's share once per image) against transformers'
    own Sam3TrackerMaskDecoder with the same weights: the same masks and scores in fp32 for
    every prompt kind, single and multimask (SAM 2's stability fallback included); the same masks
    in bf16; "off" runs transformers' module."""
    import torch

    from smartsam.agent import SmartSAMAgent
    from smartsam.models import load_backbone

    bb = load_backbone("sam3-tiny-random", device="cpu", cpu_bf16="off")
    assert bb.shared_decoder is True
    assert load_backbone("sam3-tiny-random", device="cpu", shared_decoder="off").shared_decoder is False
    model = bb.model
    # the image's positional encoding is the model's own, not the prompt encoder's copy (random
    # weights tell them apart)
    assert not torch.equal(model.shared_image_embedding.positional_embedding,
                           model.prompt_encoder.shared_embedding.positional_embedding)
    with torch.no_grad():  # random weights at transformers' init give logits of ~0.02: make them speak
        torch.manual_seed(0)
        for p in list(model.vision_encoder.parameters()) + list(model.mask_decoder.parameters()):
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.05)
    bb.shared = type(bb.shared)(bb.shared.prompt_encoder, bb.shared.mask_decoder, bb.cache_size,
                                None, bb.shared.decoder_cls)  # rebuilt on the new weights
    img = coco_image
    h, w = img.shape[:2]
    bb.set_image(img)
    g = bb.grid
    calls = []
    hook = model.mask_decoder.register_forward_hook(lambda *a: calls.append(1))
    rng = np.random.default_rng(4)
    try:
        for box, with_mask in [(False, False), (True, False), (False, True), (True, True)]:
            prompts = [Prompt(rng.uniform([0, 0], [w - 1, h - 1], size=(1 + i, 2)), [1] + [0] * i,
                              box=[w / 5 + i, h / 6, w / 2, h / 2] if box else None,
                              mask_input=rng.normal(0, 8, (g, g)).astype(np.float32) if with_mask else None)
                       for i in range(3)]
            for multimask in (True, False):
                out = decode_every_way(bb, prompts, multimask, calls)  # transformers' module, then ours
                ref = out[False, False]
                assert np.abs(ref.low_res_logits).max() > 0.5  # logits that can tell a wrong sum (1e-4 is far below)
                assert out[True, False].low_res_logits.shape == ref.low_res_logits.shape == (3, 3 if multimask else 1, g, g)
                assert np.allclose(out[True, False].low_res_logits, ref.low_res_logits, atol=1e-4)
                assert np.allclose(out[True, False].scores, ref.scores, atol=1e-5)
                assert ((out[True, True].low_res_logits > 0) == (ref.low_res_logits > 0)).mean() > 0.98
                if not multimask:  # every single mask here is unstable (0.6-0.8 < 0.98): now all stable
                    bb.cpu_bf16, thresh = False, model.mask_decoder.dynamic_multimask_stability_thresh
                    model.mask_decoder.dynamic_multimask_stability_thresh = 0.0  # the fp32 decoders' own module
                    kept = {}
                    try:
                        for shared in (False, True):
                            bb.shared_decoder = shared
                            kept[shared] = bb.predict(prompts, False)
                    finally:
                        model.mask_decoder.dynamic_multimask_stability_thresh = thresh
                    assert not np.allclose(kept[False].low_res_logits, ref.low_res_logits, atol=1e-2)
                    assert np.allclose(kept[True].low_res_logits, kept[False].low_res_logits, atol=1e-4)
                    assert np.allclose(kept[True].scores, kept[False].scores, atol=1e-5)
    finally:
        hook.remove()
        bb.shared_decoder, bb.cpu_bf16 = True, False
    # its literal click was never measured on a CPU: the fast path stays auto's choice there
    bb.cpu_bf16 = True
    assert SmartSAMAgent(bb).path == "fast"
