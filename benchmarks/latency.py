"""Latency per click, broken down, and how the agent's cost grows with its work.

    python benchmarks/latency.py [--backbone NAME] [--checkpoint PATH] [--device cpu|cuda] [--image PATH]
                                 [--repeats N] [--skip-levers] [--skip-scaling] [--only-compile | --only-shared]

Prints markdown tables. Random-weight configurations are fine for timing (the cost does not
depend on the weights) and are labelled as such. Speed is measured here, never in the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, peak_rss_mb, sync, table  # noqa: E402

from smartsam.agent import FAST_PATH_IOU, SmartSAMAgent  # noqa: E402
from smartsam.backbones.base import Prompt  # noqa: E402
from smartsam.clickers import NextChainClicker  # noqa: E402
from smartsam.io import load_image  # noqa: E402
from smartsam.masks import best_of_three  # noqa: E402
from smartsam.models import load_backbone, load_features  # noqa: E402
from smartsam.sampler import PrioriInitialSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "datasets" / "GrabCut" / "img" / "106024.jpg"


def median_time(fn, repeats: int, device) -> float:
    ts = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    ap.add_argument("--checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--skip-levers", action="store_true", help="only the per-click table (large models on a CPU)")
    ap.add_argument("--skip-compile", action="store_true", help="no eager-against-compiled table (its warm-up "
                    "compiles for 1-2 minutes on 2 CPU cores)")
    ap.add_argument("--only-compile", action="store_true", help="the eager-against-compiled table alone")
    ap.add_argument("--only-shared", action="store_true", help="the library decoder against the shared decoder "
                    "alone (A B A B, the machine's default dtype)")
    ap.add_argument("--only-attention", action="store_true", help="the image-to-token attention by SDPA against "
                    "few_key_attention alone (A B A B in bf16, each against fp32's answers on several images)")
    args = ap.parse_args()

    bb = load_backbone(args.backbone, args.checkpoint, args.device)
    image = load_image(args.image)
    h, w = image.shape[:2]
    click = (w * 0.5, h * 0.55)
    weights = "RANDOM weights (timing only)" if bb.random_weights else (args.checkpoint or "registry checkpoint")
    print(f"# SmartSAM latency: {bb.name} ({weights}) on {args.device}; image {w}x{h}")
    print(f"machine: {machine()}\n")
    # A served process is warm: one untimed click on another image first (kernel selection, allocator).
    warm = SmartSAMAgent(bb)
    warm.set_image(np.ascontiguousarray(image[::-1]))
    warm.predict((w * 0.5, h * 0.5))
    bb._cache.clear()

    if args.only_compile:
        return compiled_ab(bb, image, click, args)
    if args.only_shared:
        return shared_ab(bb, image, click, args)
    if args.only_attention:
        return attention_ab(bb, args)

    rows = []

    def first_and_later(label, answer):
        """A first click measured as one (embedding cache emptied: encoder + decoder + upsample),
        then a later click on the cached embedding; call counts from the backbone's counters."""
        for kind in ("first click (new image)", "later click (cached)"):
            ts, enc_calls, dec_calls = [], [], []
            for k in range(args.repeats) if kind.startswith("first") else range(100, 100 + args.repeats):
                if kind.startswith("first"):
                    bb._cache.clear()
                e0, d0 = bb.encoder_calls, bb.decoder_calls
                sync(args.device)
                t = time.perf_counter()
                bb.set_image(image)
                answer(k)
                sync(args.device)
                ts.append(time.perf_counter() - t)
                enc_calls.append(bb.encoder_calls - e0)
                dec_calls.append(bb.decoder_calls - d0)
            rows.append([label, kind, float(np.median(ts)), max(enc_calls), max(dec_calls)])

    def plain(k):
        r = bb.predict([Prompt([(click[0] + k * 0.01, click[1])], [1])], multimask=True)
        bb.upsample(r.low_res_logits[0, [best_of_three(r.scores[0])]])

    first_and_later("plain backbone", plain)
    for label, dedupe in [("SmartSAM fast path", FAST_PATH_IOU), ("SmartSAM literal", None)]:
        agent = SmartSAMAgent(bb, dedupe_iou=dedupe)
        # a new click each time: no answer comes from the agent's result cache
        first_and_later(label, lambda k, a=agent: (a.set_image(image), a.predict((click[0] + k * 0.01 + 0.5, click[1]))))
    # reference selection cost (DINOv2 tiny random: structure only)
    feats = load_features("dinov2-tiny-random" if bb.random_weights else "dinov2-base", args.device)
    agent = SmartSAMAgent(bb, image_features=feats)
    agent.set_image(image)
    m = np.zeros(image.shape[:2], bool)
    m[h // 4: h // 2, w // 4: w // 2] = True
    ref = agent.reference_from_mask(image, m)
    e0 = bb.encoder_calls
    r = agent.predict(click, ref)
    rows.append([f"SmartSAM reference ({feats.name})", "later click (cached)", r.timings["total"], bb.encoder_calls - e0, r.calls["decoder"]])
    print(table(["method", "click", "seconds (median)", "encoder calls", "decoder calls"], rows))
    print("\n(The same first click through the real HTTP path, image download and RLE included: benchmarks/first_click.py.)")
    print(f"\npeak RSS: {peak_rss_mb():.0f} MB" + (f"; peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if args.device.startswith("cuda") else ""))

    # Chunked decoding: the same 30 chained prompts, decoded in chunks of k prompts per pass.
    bb.set_image(image)
    init = bb.predict([Prompt([click], [1]) for _ in range(10)], multimask=True)
    chained = [Prompt([click, (w * 0.2, h * 0.2)], [1, 0], mask_input=init.low_res_logits[i // 3, i % 3]) for i in range(30)]
    rows, default_chunk = [], bb.decode_chunk
    for k in (1, 2, 4, 8, 30):
        bb.decode_chunk = k
        rows.append([k, median_time(lambda: bb.predict(chained, multimask=False), args.repeats, args.device)])
    bb.decode_chunk = default_chunk
    print("\n## One decoder call of 30 chained prompts, by prompts per forward pass\n")
    print(table(["prompts per pass", "seconds"], rows))
    roofline(bb, image, click, chained, args)

    if not args.skip_levers:
        levers(bb, image, click, args)
    if not args.skip_compile:
        compiled_ab(bb, image, click, args)

    if args.skip_scaling:
        return
    print("\n## How the cost grows (later clicks, cached embedding, fast path)\n")
    rows = []
    for n_points, aspects in [(0, ()), (1, ()), (3, (1.0,)), (6, (0.67, 1.0, 1.5))]:
        agent = SmartSAMAgent(bb, sampler=PrioriInitialSampler(num_points=n_points, box_aspects=aspects))
        agent.set_image(image)
        r = agent.predict(click)
        rows.append(["initial prompts", 1 + n_points + len(aspects), r.timings["total"], r.calls["decoder"]])
    for chain in range(0, 6):
        agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=chain))
        agent.set_image(image)
        r = agent.predict(click)
        rows.append(["chain length", chain, r.timings["total"], r.calls["decoder"]])
    for side in (320, 640, 1280):
        s = side / max(h, w)
        import cv2

        im = cv2.resize(image, (int(w * s), int(h * s)))
        agent = SmartSAMAgent(bb)
        t = time.perf_counter()
        agent.set_image(im)
        enc = time.perf_counter() - t
        r = agent.predict((im.shape[1] * 0.5, im.shape[0] * 0.55))
        rows.append(["image longest side", side, r.timings["total"], f"{r.calls['decoder']} (+ encoder {enc:.2f} s)"])
    print(table(["knob", "value", "agent s per click", "decoder calls"], rows))


def peak_gflops(device) -> tuple:
    """The machine's dense peak in GFLOP/s (fp32, bf16) and how it was estimated: on CUDA from the
    GPU's name (datasheet dense rates), on a CPU from /proc/cpuinfo (threads torch uses x clock x
    FLOP per cycle of the widest FMA units the flags name; two FMA ports assumed)."""
    from smartsam.backbones.base import cpu_has_fast_bf16

    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        for key, fp32, bf16 in (("H200", 67_000, 989_000), ("H100 PCIe", 51_000, 756_000), ("H100", 67_000, 989_000),
                                ("A100", 19_500, 312_000), ("L4", 30_300, 121_000)):
            if key in name:
                return fp32, bf16, f"{name}: datasheet dense fp32 {fp32 / 1000:g} / bf16 {bf16 / 1000:g} TFLOP/s"
        return None, None, f"{name}: no datasheet rate known here"
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None, "no /proc/cpuinfo"
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    try:  # the rated maximum; /proc/cpuinfo's "cpu MHz" is the clock of the moment
        mhz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        mhz = max((float(ln.split(":", 1)[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")), default=0.0)
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4  # fp32 lanes of one FMA
    fp32_cycle = 2 * 2 * lanes  # two ports, multiply + add
    bf16_cycle = 2 * fp32_cycle if cpu_has_fast_bf16() else fp32_cycle
    n, ghz = torch.get_num_threads(), mhz / 1000
    how = (f"{n} threads x {ghz:.2f} GHz x {fp32_cycle} fp32 / {bf16_cycle} bf16 FLOP per cycle "
           f"({'avx512f' if lanes == 16 else 'avx2' if lanes == 8 else 'sse'}"
           f"{', avx512_bf16' if bf16_cycle > fp32_cycle else ''}; an upper estimate: two FMA ports and one core per "
           f"thread assumed, AMX not counted)")
    return n * ghz * fp32_cycle, n * ghz * bf16_cycle, how


def roofline(bb, image, click, chained, args) -> None:
    """Counted work (torch.utils.flop_counter over the real calls) against the time it took: per
    decoder row (the 30 chained prompts above, one call) and per cached agent click."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e9

    agent = SmartSAMAgent(bb)
    agent.set_image(image)
    agent.predict(click)
    moved = iter(range(1, 10**6))

    def later():  # a new point every time: the agent's answer cache never answers it
        k = next(moved)
        return agent.predict((click[0] + 1.0 + 0.01 * k, click[1]))

    work = {"decoder row (30 chained prompts with mask input, one call)": (counted(lambda: bb.predict(chained, multimask=False)) / 30,
                                                                        lambda: bb.predict(chained, multimask=False), 30),
            "cached agent click": (counted(later), later, 1)}
    fp32, bf16, how = peak_gflops(args.device)
    cpu = str(args.device).startswith("cpu")
    dtype = "bf16" if (bb.cpu_bf16 if cpu else True) else "fp32"
    peak = bf16 if dtype == "bf16" else fp32
    rows = []
    for label, (gflop, fn, n) in work.items():
        t = median_time(fn, args.repeats, args.device) / n
        rate = gflop / t
        rows.append([label, f"{gflop:.2f}", t, f"{rate:.0f}", f"{100 * rate / peak:.1f}%" if peak else "n/a"])
    print(f"\n## Work done against the machine's peak ({dtype} compute; peak: {how})\n")
    print(table(["unit", "GFLOP (counted)", "seconds (median)", "GFLOP/s", "share of peak"], rows))
    between_decoder_calls(bb, later, args)


def between_decoder_calls(bb, click_fn, args) -> None:
    """How much of a cached click is not the decoder: every ``decode_rows`` call timed (the
    device synchronised at its end) against the whole click, over ``args.repeats`` clicks. The
    rest is Python, NumPy and OpenCV between decoder calls (the issue's target: <= 3 %)."""
    spent = [0.0]
    inner = bb.decode_rows

    def timed(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        sync(args.device)
        spent[0] += time.perf_counter() - t
        return out

    bb.decode_rows = timed  # an instance attribute over the method, for this measurement only
    try:
        rows = []
        for _ in range(args.repeats):
            spent[0] = 0.0
            sync(args.device)
            t = time.perf_counter()
            click_fn()
            sync(args.device)
            total = time.perf_counter() - t
            rows.append((total, spent[0]))
    finally:
        del bb.decode_rows
    total, dec = sorted(rows)[len(rows) // 2]  # the median click
    print(f"\ncached agent click (the median of {len(rows)}): {total:.3f} s, of which decoder calls {dec:.3f} s; between "
          f"them (Python, NumPy, OpenCV, copies): {total - dec:.3f} s = {100 * (total - dec) / total:.1f} %")


def timed_clicks(agent, image, clicks, shift, device):
    """The agent's cached clicks at ``clicks`` moved by ``shift`` px, its answer cache emptied
    first: the median seconds and the answers. A round passes the same ``shift`` to every variant
    it compares: a click's random streams are seeded by its 1/16-px cell, so variants timed on
    the same points make the same draws and their answers can be compared."""
    agent.set_image(image)
    agent.policy.answers.clear()
    ts, answers = [], []
    for c in clicks:
        sync(device)
        t = time.perf_counter()
        answers.append(agent.predict((c[0] + shift, c[1])))
        sync(device)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), answers


def shared_ab(bb, image, click, args) -> None:
    """The library's mask decoder module against the shared decoder (SMARTSAM_SHARED_DECODER) in one
    run, A B A B, in the backbone's default dtype: the literal agent's cached click (median of 3
    clicks per round), a decoder row (the 30 chained prompts of one call) and the answers' mask
    IoU with the library's (HQ-SAM: transformers' module gives other masks by design, see
    docs/cli-and-models.md)."""
    from smartsam.masks import mask_iou

    if not hasattr(bb, "shared_decoder"):
        print(f"\n(no shared decoder for {bb.name})")
        return
    shared0 = bb.shared_decoder
    bb.set_image(image)
    w, h = image.shape[1], image.shape[0]
    init = bb.predict([Prompt([click], [1]) for _ in range(10)], multimask=True)
    chained = [Prompt([click, (w * 0.2, h * 0.2)], [1, 0], mask_input=init.low_res_logits[i // 3, i % 3]) for i in range(30)]
    agent = SmartSAMAgent(bb, dedupe_iou=None)
    clicks = [(click[0] + dx, click[1] + dy) for dx, dy in ((0, 0), (-40, 20), (35, -25))]
    labels = {False: "library module", True: "shared decoder"}
    times, rows_t, answers = {k: [] for k in labels}, {k: [] for k in labels}, {k: [] for k in labels}
    for r in range(2):  # A B A B
        for shared in labels:
            bb.shared_decoder = shared
            t, got = timed_clicks(agent, image, clicks, (r + 1) * 1e-3, args.device)
            times[shared].append(t)
            answers[shared] += got
            rows_t[shared].append(median_time(lambda: bb.predict(chained, multimask=False), args.repeats, args.device) / 30)
    bb.shared_decoder = shared0
    rows = []
    for shared, label in labels.items():
        iou = float(np.mean([mask_iou(a.mask, b.mask) for a, b in zip(answers[shared], answers[False])]))
        rows.append([label, " / ".join(f"{x:.3f}" for x in times[shared]),
                     f"{np.median(times[False]) / np.median(times[shared]):.2f}x",
                     " / ".join(f"{x * 1e3:.1f}" for x in rows_t[shared]), f"{iou:.4f}" if shared else "(the reference)"])
    dt = "bf16" if bb.compute_dtype == torch.bfloat16 else "fp32"
    print(f"\n## Library decoder against the shared decoder ({dt}; literal path, cached embedding; two rounds, A B A B)\n")
    print(table(["decoder", "s per click (round 1 / 2)", "speed-up (median)", "ms per decoder row (round 1 / 2)",
                 "mask IoU with the library's"], rows))


def attention_ab(bb, args, images: int = 6) -> None:
    """The shared decoder's image-to-token attention by SDPA against
    :func:`~smartsam.backbones.shared_decoder.few_key_attention`, both in bf16, in one run (A B A B):
    the literal agent's cached click (median over 3 clicks on each of ``images`` GrabCut images)
    and, since bf16 rounds either way, how often each chooses the candidate fp32 chooses (same
    initial prompt, mask and chain step), their masks' IoU with fp32's and the logit signs of 30
    chained rows as fp32's."""
    from smartsam.masks import mask_iou

    if not getattr(bb, "shared_decoder", False):
        print(f"\n(no shared decoder for {bb.name})")
        return
    dec, bf0 = bb.shared.eager(torch.bfloat16), bb.cpu_bf16
    few0 = dec.few_keys
    paths = sorted((ROOT.parent / "shared" / "datasets" / "GrabCut" / "img").glob("*.jpg"))[:images]
    arms = {"fp32 (SDPA)": (False, False), "bf16, SDPA": (True, False), "bf16, few_key_attention": (True, True)}
    times = {a: [[], []] for a in arms}
    answers, signs = {a: [] for a in arms}, {a: [] for a in arms}
    key = lambda c: (c.prompt_index, c.mask_index, c.chain_step)  # noqa: E731 (scores differ in their last bits)
    try:
        for path in paths:
            image = load_image(str(path))
            h, w = image.shape[:2]
            clicks = [(w * 0.5, h * 0.55), (w * 0.35, h * 0.4), (w * 0.65, h * 0.5)]
            for r in range(2):
                for arm, (bf16, few) in arms.items():
                    if r and not bf16:
                        continue  # fp32 is the reference for the answers, not timed against
                    bb.cpu_bf16, dec.few_keys = bf16, few
                    agent = SmartSAMAgent(bb, dedupe_iou=None)
                    t, got = timed_clicks(agent, image, clicks, (r + 1) * 1e-3, args.device)
                    times[arm][r].append(t)
                    if r == 0:
                        answers[arm] += got
                        init = bb.predict([Prompt([clicks[0]], [1]) for _ in range(10)], multimask=True)
                        chained = [Prompt([clicks[0], (w * 0.2, h * 0.2)], [1, 0],
                                          mask_input=init.low_res_logits[i // 3, i % 3]) for i in range(30)]
                        signs[arm].append(bb.predict(chained, multimask=False).low_res_logits > 0)
    finally:
        bb.cpu_bf16, dec.few_keys = bf0, few0
    ref = "fp32 (SDPA)"
    rows = []
    for arm in arms:
        if arm == ref:
            continue
        same = sum(key(a.candidate) == key(b.candidate) for a, b in zip(answers[arm], answers[ref]))
        iou = float(np.mean([mask_iou(a.mask, b.mask) for a, b in zip(answers[arm], answers[ref])]))
        sg = float(np.mean([(a == b).mean() for a, b in zip(signs[arm], signs[ref])]))
        rows.append([arm, " / ".join(f"{np.median(x):.3f}" for x in times[arm]), f"{same}/{len(answers[arm])}",
                     f"{iou:.4f}", f"{100 * sg:.2f} %"])
    print(f"\n## Image-to-token attention: SDPA against few_key_attention (bf16; literal path, cached embedding; "
          f"{len(paths)} GrabCut images x 3 clicks; two rounds, A B A B)\n")
    print(table(["attention", "s per click (median, round 1 / 2)", "same candidate as fp32", "mask IoU with fp32's",
                 "logit signs of 30 chained rows as fp32's"], rows))


def compiled_ab(bb, image, click, args) -> None:
    """Eager against compiled (SMARTSAM_COMPILE) and, on CUDA, compiled + the step on the device,
    in one run, A B (C) A B (C): the literal agent's cached click (median of 3 clicks per round) and a decoder
    row (the 30 chained prompts of one call); the warm-up's cost; and whether the answers are
    the eager path's (same chosen candidate, mask IoU, logit signs of the 30 rows)."""
    from smartsam.backbones.compiled import CompiledDecoder, row_buckets
    from smartsam.masks import mask_iou

    if not getattr(bb, "shared_decoder", False):
        print(f"\n(no compiled step: {bb.name} does not decode through the shared decoder)")
        return
    dtype, cpu = bb.compute_dtype, str(args.device).startswith("cpu")
    buckets = row_buckets(bb.device.type, bb.decode_chunk)
    bb.set_image(image)
    w, h = image.shape[1], image.shape[0]
    init = bb.predict([Prompt([click], [1]) for _ in range(10)], multimask=True)
    chained = [Prompt([click, (w * 0.2, h * 0.2)], [1, 0], mask_input=init.low_res_logits[i // 3, i % 3]) for i in range(30)]
    agents = {"eager": SmartSAMAgent(bb, dedupe_iou=None), "compiled": SmartSAMAgent(bb, dedupe_iou=None)}
    if not cpu:  # on a CPU the step on the device is the slower (benchmarks/transfers.py: 2.2 s against 1.6 s)
        agents["compiled + step on the device"] = SmartSAMAgent(bb, dedupe_iou=None, chain_clicks="device")
    if bb.shared.step is None:  # built eager (SMARTSAM_COMPILE off): the step it would have
        bb.shared.step = lambda dec: CompiledDecoder(dec, buckets)
    bb.shared.compiled = True
    step = bb.shared.decoder(dtype)
    t = time.perf_counter()
    for label, agent in agents.items():
        if label != "eager":
            agent.warm_up()
    with step.recording():  # the 30-row call's kind too (a click's rows come in chunks)
        bb.predict(chained, multimask=False)
    warm = time.perf_counter() - t
    clicks = [(click[0] + dx, click[1] + dy) for dx, dy in ((0, 0), (-40, 20), (35, -25))]
    times = {k: [] for k in agents}
    row_times = {"eager": [], "compiled": []}
    answers, logits = {}, {}
    for r in range(2):  # A B C A B C
        for label, agent in agents.items():
            bb.shared.compiled = label != "eager"
            t, got = timed_clicks(agent, image, clicks, (r + 1) * 1e-3, args.device)
            times[label].append(t)
            answers.setdefault(label, []).extend(got)
            if label in row_times:
                row_times[label].append(median_time(lambda: bb.predict(chained, multimask=False), args.repeats, args.device) / 30)
                logits[label] = bb.predict(chained, multimask=False).low_res_logits
    bb.shared.compiled = False
    eager = answers["eager"]
    rows = []
    for label in agents:
        same = [a.candidate.prompt_index == b.candidate.prompt_index and a.candidate.chain_step == b.candidate.chain_step
                and a.candidate.mask_index == b.candidate.mask_index for a, b in zip(answers[label], eager)]
        iou = float(np.mean([mask_iou(a.mask, b.mask) for a, b in zip(answers[label], eager)]))
        row = row_times.get(label)
        rows.append([label, " / ".join(f"{x:.3f}" for x in times[label]),
                     f"{np.median(times['eager']) / np.median(times[label]):.2f}x",
                     " / ".join(f"{x * 1e3:.1f}" for x in row) if row else "(as compiled)",
                     f"{sum(same)}/{len(same)}" if label != "eager" else "(the reference)",
                     f"{iou:.4f}" if label != "eager" else "-"])
    signs = float(np.mean((logits["compiled"] > 0) == (logits["eager"] > 0)))
    h = step.health()
    print(f"\n## Eager against compiled (torch.compile, inductor{', CUDA graphs' if h['cuda_graphs'] else ''}; "
          f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}; literal path, cached embedding; two rounds, "
          f"{' '.join('ABC'[:len(agents)])} {' '.join('ABC'[:len(agents)])})\n")
    print(table(["decoder step", "s per click (round 1 / 2)", "speed-up (median)", "ms per decoder row (round 1 / 2)",
                 "same candidate as eager", "mask IoU with eager"], rows))
    print(f"\nwarm-up: {warm:.1f} s ({h['compiled_steps']} (rows, kind) steps compiled for buckets {buckets}); "
          f"calls served compiled {h['compiled_calls']}, eager (a kind not compiled) {h['eager_calls']}; "
          f"logit signs of the 30 chained rows as eager: {100 * signs:.2f} %")


def levers(bb, image, click, args) -> None:
    """Each lever against the first release's configuration: seconds per cached click of the literal
    agent (its work does not depend on the weights, unlike the fast path's pruning) and whether the
    answer is the same (mask IoU with the first row's answer); then where the default's time goes."""
    from smartsam.backbones.base import cpu_has_fast_bf16
    from smartsam.masks import mask_iou

    cpu = str(args.device).startswith("cpu")
    has_shared = hasattr(bb, "shared_decoder")
    threads0, chunk0, bf0, shared0 = torch.get_num_threads(), bb.decode_chunk, bb.cpu_bf16, getattr(bb, "shared_decoder", False)
    clicks = [(click[0] + dx, click[1] + dy) for dx, dy in ((0, 0), (-40, 20), (35, -25))]

    def run(chain_clicks="host"):
        agent = SmartSAMAgent(bb, dedupe_iou=None, chain_clicks=chain_clicks)
        agent.set_image(image)
        ts, masks = [], []
        for c in clicks:
            sync(args.device)
            t = time.perf_counter()
            r = agent.predict(c)
            sync(args.device)
            ts.append(time.perf_counter() - t)
            masks.append(r.mask)
        return float(np.median(ts)), masks, agent.path

    if cpu:
        configs = [("fp32, chunk 4, all threads, library decoder (the first release)", {"chunk": 4}),
                   ("bf16 autocast", {"bf16": True, "chunk": 4}), ("chunk 2", {"chunk": 2}), ("chunk 8", {"chunk": 8}),
                   ("1 thread", {"threads": 1, "chunk": 4}), ("bf16 + chunk 2 (the second release)", {"bf16": True, "chunk": 2})]
        if has_shared:
            configs += [("shared decoder, fp32, chunk 2", {"shared": True, "chunk": 2}),
                        ("shared decoder + bf16 + chunk 2 (the default where the CPU has bf16)", {"shared": True, "bf16": True, "chunk": 2})]
    else:
        configs = [("library decoder, bf16 autocast", {"chunk": chunk0})]
        if has_shared:
            configs += [("shared decoder, bf16", {"shared": True, "chunk": chunk0})]
        # the step's chain clicks as one batch of tensor work (smartsam.chain_clicks): on a CPU
        # OpenCV's one chain at a time is the faster, so it is measured where it is meant to pay
        configs += [("chain clicks on the device", {"shared": has_shared, "chunk": chunk0, "chain_clicks": "device"})]
    rows, base, path = [], None, None
    for label, cfg in configs:
        bb.cpu_bf16, bb.decode_chunk = cfg.get("bf16", False), cfg.get("chunk", chunk0)
        if has_shared:
            bb.shared_decoder = cfg.get("shared", False)
        torch.set_num_threads(cfg.get("threads", threads0))
        bb._cache.clear()
        bb.set_image(image)  # the encoder runs under the same lever (bf16 changes the embedding)
        t, masks, path = run(cfg.get("chain_clicks", "host"))
        if base is None:
            base = masks
        ious = [mask_iou(a, b) for a, b in zip(masks, base)]
        rows.append([label, t, float(np.mean(ious)), f"{sum(i >= 0.95 for i in ious)}/{len(ious)}"])
    bb.cpu_bf16, bb.decode_chunk = bf0, chunk0
    if has_shared:
        bb.shared_decoder = shared0
    torch.set_num_threads(threads0)
    hw = f"CPU bf16 hardware (AMX or AVX512-BF16): {'yes' if cpu_has_fast_bf16() else 'no'}" if cpu else torch.cuda.get_device_name(0)
    print(f"\n## Levers ({path} path, cached embedding, median of {len(clicks)} clicks; {hw})\n")
    print(table(["lever", "agent s per click", "mean mask IoU vs first row", "same mask (IoU >= 0.95)"], rows))

    # Where the default configuration's cached click spends its time (operator self time).
    from torch.profiler import ProfilerActivity, profile

    bb._cache.clear()
    bb.set_image(image)
    agent = SmartSAMAgent(bb)
    agent.set_image(image)
    agent.predict(clicks[0])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if not cpu else [])
    with profile(activities=acts) as prof:
        sync(args.device)
        t = time.perf_counter()
        r = agent.predict((clicks[0][0] + 1.0, clicks[0][1]))
        sync(args.device)
        wall = time.perf_counter() - t

    ev_all = prof.key_averages()
    for device_side in ([False] if cpu else [True, False]):
        def self_time(e, d=device_side):
            return e.self_device_time_total if d else e.self_cpu_time_total

        ev = sorted(ev_all, key=lambda e: -self_time(e))
        total = sum(self_time(e) for e in ev) or 1.0
        rows = [[e.key[:80], e.count, self_time(e) / 1e6, f"{100 * self_time(e) / total:.0f}%"] for e in ev[:8]]
        kind = "CUDA kernel" if device_side else "CPU operator"
        print(f"\n## Where a cached click's time goes ({agent.path} path, default configuration, torch.profiler, {kind} self time)\n")
        print(table(["operator", "calls", "seconds", "share"], rows))
        print(f"\n{kind} time in all {total / 1e6:.3f} s")
    split = ", ".join(f"{k} {v:.3f} s" for k, v in r.timings.items() if k != "total")
    print(f"wall {wall:.3f} s under the profiler; the agent's own split: {split}")


if __name__ == "__main__":
    main()
