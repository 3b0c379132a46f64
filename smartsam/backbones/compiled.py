"""The shared decoder's step through ``torch.compile``, with few shapes and no compilation
inside a click.

Each kind of call (points per row, a mask input or not, SAM's three masks or one, a box or not,
rows of one image or several) is compiled ahead, at start-up: :meth:`CompiledDecoder.recording`
around a warm-up click (:meth:`smartsam.agent.SmartSAMAgent.warm_up`), then
:meth:`CompiledDecoder.warm_buckets` for every row bucket of each kind. Rows are padded up to a
bucket (a row repeated, its answer dropped): torch's automatic dynamic shapes make a kind's
graph dynamic in its rows from the second size on (about two compilations per kind), and on
CUDA, where each concrete shape is a CUDA graph of its own, the buckets bound how many are
recorded. After the warm-up nothing compiles: a kind never compiled runs the eager decoder, and
a call whose guards fail after all (a stride, a dtype) is caught under the compiler's
``fail_on_recompile`` stance and runs eager too; both are counted
(:attr:`CompiledDecoder.eager_calls`, the backend's health).

Whether it pays is measured, never assumed (``benchmarks/latency.py --only-compile`` prints
eager against compiled in one run, A B A B): :data:`COMPILE_MEASURED_FASTER` says where ``auto``
turns it on.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import fields
from typing import Callable, Dict, Optional, Sequence, Set, Tuple, Union

import torch

from .shared_decoder import ImageShare, SharedDecoder, SharedDecoders, shared_decoder_setting

log = logging.getLogger("smartsam")

# Where ``SMARTSAM_COMPILE=auto`` compiles: device types on which benchmarks/latency.py measured
# the compiled cached click faster than the eager one, with the eager path's answers. Measured so
# far (docs/results.md): 2 CPU cores (AMD EPYC, AVX512-BF16, SAM 2.1 tiny random, inductor, bf16):
# 1.03-1.12x in four runs, 20-101 s of compiling at each start, another candidate chosen on 1 of
# 6 clicks - not on. CUDA: not measured yet (no GPU lent; scripts/gpu-check.sh prints it) - not
# on until it is.
COMPILE_MEASURED_FASTER: Set[str] = set()


def compile_setting(value: Union[str, bool, None], device_type: str) -> bool:
    """Resolve ``SMARTSAM_COMPILE``: "auto" (on where measured faster,
    :data:`COMPILE_MEASURED_FASTER`), "on", "off" or a bool."""
    if isinstance(value, bool):
        return value
    v = (value or "auto").strip().lower()
    if v not in ("auto", "on", "off"):
        raise ValueError(f"SMARTSAM_COMPILE must be auto, on or off, not {v!r}")
    return device_type in COMPILE_MEASURED_FASTER if v == "auto" else v == "on"


def row_buckets(device_type: str, decode_chunk: int) -> Tuple[int, ...]:
    """Row counts a compiled step is made for. A CPU decodes in chunks of ``decode_chunk`` rows
    (1 to ``decode_chunk``: no padding, a padded row costs as much as a real one there); CUDA in
    one pass, padded up to a power of two (at most 2x the rows, where a row is cheap and a CUDA
    graph per row count would be hundreds), 512 at most (a larger call runs in pieces of 512).
    A CPU chunk larger than 16 is decoded in pieces of 16."""
    if device_type == "cpu":
        return tuple(range(1, min(max(1, decode_chunk), 16) + 1))
    return tuple(1 << k for k in range(10))


def attach_shared_decoders(backbone, prompt_encoder, mask_decoder, shared_decoder: Union[str, bool],
                           compile: Union[str, bool], decoder_cls: Callable[..., SharedDecoder] = SharedDecoder) -> None:
    """Give a backbone its ``shared_decoder`` flag (``SMARTSAM_SHARED_DECODER``) and its
    :class:`SharedDecoders` (of ``decoder_cls``) as ``shared``, their step compiled where
    ``compile`` (``SMARTSAM_COMPILE``) says so and the backbone decodes through them (warm them up
    before serving: :meth:`smartsam.agent.SmartSAMAgent.warm_up`). The decoder of the backbone's
    compute dtype is built now, so the first click does not pay for it."""
    backbone.shared_decoder = shared_decoder_setting(shared_decoder)
    on = backbone.shared_decoder and compile_setting(compile, backbone.device.type)
    buckets = row_buckets(backbone.device.type, backbone.decode_chunk)
    backbone.shared = SharedDecoders(prompt_encoder, mask_decoder, backbone.cache_size,
                                     (lambda dec: CompiledDecoder(dec, buckets)) if on else None, decoder_cls)
    if backbone.shared_decoder:
        backbone.shared.decoder(backbone.compute_dtype)


# (points per row or None, a mask input, multimask, a box, rows of several images)
Kind = Tuple[Optional[int], bool, bool, bool, bool]


class CompiledDecoder:
    """A :class:`SharedDecoder` called through ``torch.compile``; same arguments and outputs.

    Args:
        decoder: the eager decoder (its weights and arithmetic).
        buckets: row counts compiled (see :func:`row_buckets`); a call's rows are padded up to
            the next one.
        backend: ``torch.compile``'s backend ("inductor"; tests use dynamo's "eager" backend:
            its tracing, guards and stances without generating code).
        mode: ``torch.compile``'s mode; default "reduce-overhead" (CUDA graphs) on CUDA, the
            default mode elsewhere.
    """

    def __init__(self, decoder: SharedDecoder, buckets: Sequence[int], backend: str = "inductor",
                 mode: Optional[str] = None) -> None:
        self.decoder = decoder
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        device_type = decoder.pe_terms[0].device.type
        if mode is None and device_type == "cuda":
            mode = "reduce-overhead"
        self.cuda_graphs = mode == "reduce-overhead"
        self.fn = torch.compile(decoder.forward, backend=backend, mode=mode)
        self.ready: Set[Tuple[int, Kind]] = set()  # (bucket, kind) compiled
        self._examples: Dict[Kind, tuple] = {}  # one call of each kind seen while recording
        self._recording = False
        self.error: Optional[str] = None  # why it runs eager after all (fall_back)
        self.missed: Optional[str] = None  # the last guard failure of a kind thought compiled
        self.compiled_calls = 0
        self.eager_calls = 0  # passes run eager: a kind never compiled, a guard that failed

    # -- start-up ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self):
        """Inside the block every call compiles what it needs and its kind is kept (wrap a
        warm-up click); :meth:`warm_buckets` then compiles the other row counts of each kind.
        Nothing is recorded once the compiler failed (:meth:`fall_back`)."""
        before = self._recording
        self._recording = self.error is None
        try:
            with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
                yield self
        finally:
            self._recording = before

    @torch.inference_mode()  # as the calls it serves run (the guards check it)
    def warm_buckets(self) -> int:
        """Compile every bucket of every kind seen while recording (rows of a recorded call
        repeated); returns how many (bucket, kind) pairs are ready. On CUDA each is run three
        times: a CUDA graph is recorded on its second run, replayed from the third (on this
        thread: graphs belong to the thread that records them, so warm up where the calls will
        come from)."""
        with self.recording():
            if self._recording:
                for kind, args in list(self._examples.items()):
                    for b in self.buckets:
                        for _ in range(3 if self.cuda_graphs else 1 if (b, kind) not in self.ready else 0):
                            self._run(b, kind, _take(args, torch.zeros(b, dtype=torch.long, device=_device(args))), b)
        self._examples.clear()  # their tensors (shares: tens of MB) are not needed any more
        return len(self.ready)

    def fall_back(self, reason: str) -> None:
        """Run eager from now on (the compiler failed: ``reason`` is shown in :meth:`health`)."""
        self.error = reason
        self._recording = False
        self.ready.clear()
        self._examples.clear()

    def health(self) -> Dict[str, object]:
        """``compiled_steps``: (rows, kind) pairs compiled; ``compiled_calls`` / ``eager_calls``:
        passes served each way since start-up; ``error``: why it runs eager, if it does."""
        return {"compiled_steps": len(self.ready), "compiled_calls": self.compiled_calls, "eager_calls": self.eager_calls,
                "cuda_graphs": self.cuda_graphs, "error": self.error}

    # -- calls -------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, share: ImageShare, coords: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                 masks: Optional[torch.Tensor], multimask: bool,
                 boxes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`SharedDecoder.__call__`."""
        args = (share, coords, labels, masks, multimask, boxes)
        b = (coords if coords is not None else boxes).shape[0]
        if b == 0:
            return self.decoder.forward(*args)
        top = self.buckets[-1]
        if b > top:  # in pieces of the largest bucket
            parts = [self(*_take(args, torch.arange(i, min(b, i + top), device=_device(args)))) for i in range(0, b, top)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        kind = _kind(args)
        bucket = next((k for k in self.buckets if k >= b), None)
        if self._recording:
            self._examples.setdefault(kind, _take(args, torch.zeros(1, dtype=torch.long, device=_device(args))))
        elif (bucket, kind) not in self.ready:
            self.eager_calls += 1
            return self.decoder.forward(*args)
        padded = args
        if bucket > b:
            dev = _device(args)
            padded = _take(args, torch.cat([torch.arange(b, device=dev), torch.zeros(bucket - b, dtype=torch.long, device=dev)]))
        out = self._run(bucket, kind, padded, b)
        if out is None:  # its guards failed after all: eager, on the rows asked for
            self.eager_calls += 1
            return self.decoder.forward(*args)
        return out

    def _run(self, bucket: int, kind: Kind, args: tuple, rows: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The compiled step on ``args`` (``bucket`` rows), its first ``rows`` rows; None when a
        call outside a warm-up would have had to compile."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self._recording:
            out = self.fn(*args)
            self.ready.add((bucket, kind))
        else:
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = self.fn(*args)
            except RuntimeError as e:  # raised before anything ran (torch/_dynamo/eval_frame.py)
                if "fail_on_recompile" not in str(e):
                    raise
                if self.missed is None:
                    log.warning("a compiled decoder step did not fit a call (it ran eager): %s", str(e).splitlines()[-1])
                self.missed = str(e)
                return None
            self.compiled_calls += 1
        # a CUDA graph's outputs are overwritten by its next replay: the caller gets its own copy
        # (of the rows asked for only)
        return tuple(o[:rows].clone() if self.cuda_graphs else o[:rows] for o in out)


def _kind(args: tuple) -> Kind:
    share, coords, _, masks, multimask, boxes = args
    return (None if coords is None else int(coords.shape[1]), masks is not None, bool(multimask), boxes is not None,
            share.tokens.dim() == 3)


def _device(args: tuple) -> torch.device:
    return args[0].tokens.device


def _take(args: tuple, idx: torch.Tensor) -> tuple:
    """The call's rows ``idx`` (a stacked share's rows too)."""
    share, coords, labels, masks, multimask, boxes = args
    if share.tokens.dim() == 3:  # laid out as ImageShare.stack lays them out (the guards check strides)
        def rows(name):
            x = getattr(share, name)
            if x is None:
                return None
            x = x.index_select(0, idx)
            return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x  # feature maps
        share = ImageShare(*(rows(f.name) for f in fields(ImageShare)))
    sel = [None if x is None else x.index_select(0, idx) for x in (coords, labels, masks)]
    return (share, *sel, multimask, None if boxes is None else boxes.index_select(0, idx))
