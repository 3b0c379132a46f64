"""The compiled decoder step (SMARTSAM_COMPILE): warmed up before the model serves, never
compiling inside a click, answering as the eager step, and eager again when the compiler fails.

The compiler here is dynamo's ``eager`` backend (its tracing, guards, recompilation and stance,
the captured graphs run by PyTorch): inductor's code generation costs minutes on 2 cores.
``SMARTSAM_TEST_COMPILE_BACKEND=inductor`` runs the same tests with it; ``benchmarks/latency.py
--only-compile`` times inductor and compares its answers with eager's (scripts/gpu-check.sh runs
both the tests and that table on CUDA).
"""

import os
import threading

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from backend.config import Settings
from backend.serving.models import Models
from backend.serving.scheduler import Scheduler
from smartsam.agent import SmartSAMAgent
from smartsam.backbones.base import Prompt
from smartsam.backbones.compiled import CompiledDecoder, compile_setting, row_buckets
from smartsam.clickers import NextChainClicker
from smartsam.models import load_backbone
from smartsam.sampler import PrioriInitialSampler

BACKEND = os.environ.get("SMARTSAM_TEST_COMPILE_BACKEND", "eager")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()  # compiled graphs of one test never serve another


def _compiled(settings, backend=BACKEND):
    """The settings' backbone with its step compiled by ``backend`` (nothing compiled yet:
    torch.compile is lazy, so the compiler can be chosen before the first call)."""
    bb = load_backbone(**settings.backbone_kwargs())
    step = bb.compiled_step()
    assert step is not None
    step.fn = torch.compile(step.decoder.forward, backend=backend,
                            mode="reduce-overhead" if step.cuda_graphs and backend == "inductor" else None)
    return bb, step


def test_compile_setting():
    assert compile_setting("on", "cpu") and not compile_setting("off", "cuda") and compile_setting(True, "cpu")
    from smartsam.backbones.compiled import COMPILE_MEASURED_FASTER

    for device in ("cpu", "cuda"):  # auto: exactly where the benchmark measured it faster
        assert compile_setting("auto", device) == (device in COMPILE_MEASURED_FASTER)
    with pytest.raises(ValueError, match="SMARTSAM_COMPILE"):
        compile_setting("max", "cpu")
    assert row_buckets("cpu", 2) == (1, 2) and row_buckets("cuda", 1 << 30)[-1] == 512
    assert load_backbone("sam2.1_hiera_tiny-random", device="cpu", compile="off").compiled_step() is None
    # the step compiles what the model decodes through: not the library's own module
    assert load_backbone("sam2.1_hiera_tiny-random", device="cpu", compile="on", shared_decoder="off").compiled_step() is None


def test_warm_up_compiles_its_kinds_then_clicks_never_compile_and_answer_as_eager(grabcut_image):
    settings = Settings.from_env({}, backbone="sam2.1_hiera_tiny-random", device="cpu", compile="on", cpu_bf16="off")
    bb, step = _compiled(settings)
    # a small agent (3 prompts, chains of 1): every kind of call the full one makes but the point counts
    agent = SmartSAMAgent(bb, sampler=PrioriInitialSampler(num_points=1, box_aspects=(1.0,)),
                          clicker=NextChainClicker(chain_length=1))
    ready = agent.warm_up()
    assert ready["compiled_steps"] >= 4 and ready["error"] is None, ready
    kinds = {kind for _, kind in step.ready}
    assert {(k[1], k[2]) for k in kinds} >= {(False, True), (True, False)}  # SAM's 3 masks; chains' mask inputs

    agent.set_image(grabcut_image)
    clicks = [(200.0, 150.0), (330.0, 260.0)]
    graphs = counters["stats"]["unique_graphs"]
    compiled = [agent.predict(c) for c in clicks]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled inside a click
    h = step.health()
    assert h["compiled_calls"] > 0 and h["eager_calls"] == 0, h
    # a kind of call the warm-up never saw (eight points) runs eager, counted, still compiling nothing
    agent.refine([(200.0 + 9 * k, 150.0) for k in range(8)], [1] * 8)
    assert step.health()["eager_calls"] == 1 and counters["stats"]["unique_graphs"] == graphs

    step.fall_back("the eager reference")  # the same decoder, eager from here on
    eager_agent = SmartSAMAgent(bb, sampler=agent.sampler, clicker=agent.clicker)  # its own answer cache
    eager_agent.set_image(grabcut_image)
    for a, c in zip(compiled, clicks):
        b = eager_agent.predict(c)
        assert a.candidate.prompt_index == b.candidate.prompt_index and a.candidate.chain_step == b.candidate.chain_step
        assert np.isclose(a.score, b.score, atol=1e-4) and (a.mask == b.mask).mean() > 0.999


def test_hq_sam_decodes_through_the_same_compiled_step(grabcut_image):
    """HQ-SAM's shared decoder (its HQ features in the share, SAM's masks sorted by score inside
    the step) behind the same compiled step, through the backbone's own calls: recorded, its
    buckets compiled, then calls of every kind (a point, a box, chained rows with NumPy mask
    inputs, one row and two) compile nothing, run compiled, and answer as the eager step. Seen
    failing before the fix: a single row's NumPy mask input carried NumPy's stride 0 on its new
    axis, failed the step's stride guard and ran eager."""
    settings = Settings.from_env({}, backbone="sam_hq_vit_tiny-random", device="cpu", compile="on", cpu_bf16="off")
    bb, step = _compiled(settings)
    bb.set_image(grabcut_image)
    rng = np.random.default_rng(0)
    calls = [([Prompt([[200.0, 150.0]], [1]), Prompt([[90.0, 60.0]], [1])], True),
             ([Prompt(box=[40.0, 30.0, 300.0, 260.0])], True),
             ([Prompt([[200.0, 150.0], [120.0, 90.0]], [1, 0], mask_input=rng.normal(0, 4, (256, 256)).astype(np.float32))
               for _ in range(2)], False)]
    with step.recording():
        for prompts, multimask in calls:
            bb.predict(prompts, multimask)
    assert step.warm_buckets() >= 1 and len(step.ready) == 6  # buckets 1 and 2 of each kind
    graphs = counters["stats"]["unique_graphs"]
    calls.append((calls[-1][0][:1], False))  # one chained row alone
    got = [bb.predict(prompts, multimask) for prompts, multimask in calls]
    assert counters["stats"]["unique_graphs"] == graphs
    assert step.compiled_calls == 4 and step.eager_calls == 0, step.missed
    step.fall_back("the eager reference")
    for (prompts, multimask), a in zip(calls, got):
        b = bb.predict(prompts, multimask)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-3)


def test_the_backend_warms_up_before_it_serves_and_stays_eager_when_the_compiler_fails(grabcut_image):
    compiling, give_up, threads = threading.Event(), threading.Event(), []

    def broken(gm, inputs):  # a compiler that takes its time, then fails (no C++ compiler, say)
        threads.append(threading.current_thread())
        compiling.set()
        give_up.wait(30)
        raise RuntimeError("no C++ compiler on this machine")

    settings = Settings.from_env({}, backbone="sam2.1_hiera_tiny-random", device="cpu", compile="on", chain_length=1)
    bb, step = _compiled(settings, backend=broken)
    models = Models(settings)
    scheduler = Scheduler(bb)  # the model's thread: the warm-up runs there
    t = threading.Thread(target=models._warm_up, args=(bb, scheduler))
    t.start()
    assert compiling.wait(60)
    assert models.health()["warming"] is True  # health says so while it compiles
    # on the model's thread, where the clicks will decode (CUDA graphs belong to one thread)
    assert threads == [scheduler._thread]
    give_up.set()
    t.join(60)
    assert models.health()["warming"] is False and "no C++ compiler" in step.health()["error"]
    agent = models._make_agent(bb, settings.agent)  # the model serves, eager
    agent.set_image(grabcut_image)
    assert agent.predict((200.0, 150.0)).mask.shape == grabcut_image.shape[:2]
    assert step.health()["eager_calls"] > 0 and step.health()["compiled_calls"] == 0
    scheduler.close()


@pytest.mark.parametrize("device", DEVICES)
def test_buckets_padding_pieces_and_a_failed_guard_answer_as_the_rows_alone(device, grabcut_image):
    """Rows padded up to a bucket (a row repeated), a call larger than the largest bucket (in
    pieces), buckets compiled by warm_buckets from one recorded call, and a call whose guards
    fail (float64 points where float32 were compiled): every row gets the eager answer, and the
    failed guard runs eager, counted, without compiling."""
    bb = load_backbone("sam2.1_hiera_tiny-random", device=device, cpu_bf16="off")
    emb = bb.embed(grabcut_image)
    dec = bb.shared.decoder(torch.float32)
    share = bb._share(emb)
    step = CompiledDecoder(dec, buckets=(2, 4), backend=BACKEND,
                           mode="reduce-overhead" if device == "cuda" and BACKEND == "inductor" else None)
    g = torch.Generator().manual_seed(0)

    @torch.inference_mode()  # made as Backbone.decode_rows makes them (the guards tell the two kinds apart)
    def call(rows, dtype=torch.float32):
        coords = (torch.rand(rows, 2, 2, generator=g) * 1024).to(device, dtype)
        labels = torch.tensor([[1, 0]], dtype=torch.int32).repeat(rows, 1).to(device)
        masks = torch.randn(rows, 1, 256, 256, generator=g).to(device)
        return (share, coords, labels, masks, False)

    with step.recording():  # one call of 3 rows: bucket 4 compiled, its kind kept
        first = call(3)
        step(*first)
    kind = (2, True, False, False, False)
    assert step.ready == {(4, kind)}
    assert step.warm_buckets() == 2 and step.ready == {(b, kind) for b in (2, 4)}
    graphs = counters["stats"]["unique_graphs"]
    for args in [first, call(1), call(2), call(9)]:  # 1 row padded to 2; 9 rows: pieces of 4, 4 and 1 (padded)
        low, iou = step(*args)
        ref_low, ref_iou = dec(*args)
        assert low.shape == ref_low.shape == (args[1].shape[0], 1, 256, 256)
        torch.testing.assert_close(low, ref_low, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(iou, ref_iou, atol=1e-4, rtol=1e-4)
    assert step.eager_calls == 0 and step.compiled_calls == 6 and counters["stats"]["unique_graphs"] == graphs
    odd = call(2, torch.float64)
    low, _ = step(*odd)
    torch.testing.assert_close(low, dec(*odd)[0], atol=1e-3, rtol=1e-3)
    assert step.eager_calls == 1 and step.missed and counters["stats"]["unique_graphs"] == graphs
