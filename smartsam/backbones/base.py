"""The one small interface SmartSAM needs from a promptable segmenter.

A backbone encodes an image once (:meth:`Backbone.embed`, cached by content hash) and then
decodes whole batches of prompts in as few decoder calls as possible (:meth:`Backbone.decode_rows`:
each row names its image's :class:`Embedding`, so one call serves prompts of many images).
Batching lives here, in one place: prompts are grouped by what they carry (a box or not, a
``mask_input`` or not), points are padded with label ``-1`` ("not a point") to a common count,
and each group is one decoder call. :meth:`Backbone.set_image` and :meth:`Backbone.predict` are
the one-image view of the same (a current image, rows all on it).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..masks import LowResFrame


ONE_PASS = 1 << 30  # decode_chunk of a backbone that decodes a whole group in one pass (CUDA)


@dataclass
class Prompt:
    """One prompt for the mask decoder.

    Attributes:
        points: ``(N, 2)`` float array of ``(x, y)`` image pixel coordinates (may be empty).
        labels: ``(N,)`` int array, 1 positive, 0 negative.
        box: optional ``(4,)`` float array ``(x0, y0, x1, y1)`` in image pixels.
        mask_input: optional ``(g, g)`` float array of low-res logits from an earlier decode
            of the same image (SAM's way of carrying a mask into the next click); ``g`` is the
            backbone's :attr:`Backbone.grid` (256; 288 for SAM 3). A tensor on the backbone's
            device (from :meth:`Backbone.predict_tensors`) is taken as it is, without a copy.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: Optional[np.ndarray] = None
    mask_input: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.points.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.points.shape[0]} points but {self.labels.shape[0]} labels")
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        if self.points.shape[0] == 0 and self.box is None:
            raise ValueError("a prompt needs at least one point or a box")

    @property
    def kind(self) -> Tuple[bool, bool]:
        """Batching key: (has a box, has a mask_input)."""
        return self.box is not None, self.mask_input is not None


@dataclass
class DecodeResult:
    """Decoder output for a batch of B prompts, M masks each (M = 3 multimask, else 1).

    Attributes:
        low_res_logits: ``(B, M, g, g)`` float32 logits (``g`` = the backbone's grid); ``> 0`` is the mask.
        scores: ``(B, M)`` float32 IoU-head predictions.
        frame: how the low-res grid maps to the image (see :class:`~smartsam.masks.LowResFrame`).
    """

    low_res_logits: np.ndarray
    scores: np.ndarray
    frame: LowResFrame


@dataclass(eq=False)
class Embedding:
    """One encoded image: a handle that rows of :meth:`Backbone.decode_rows` name. Holding it keeps
    the encoder output alive even after the backbone's LRU cache dropped it (a job mid-chain).

    Attributes:
        key: the image's cache key (content hash unless the caller named it).
        image_hw: ``(H, W)`` of the image.
        state: the adapter's encoder output.
    """

    key: str
    image_hw: Tuple[int, int]
    state: Any


def image_key(image: np.ndarray) -> str:
    """Content hash of an ``(H, W, 3)`` uint8 image (shape included), used as the cache key."""
    h = hashlib.sha1()
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    """True when this CPU does bf16 arithmetic in hardware (AMX or AVX512-BF16): detected, never
    assumed. Measured on a 2-core AVX512-BF16 machine: the agent's cached click 25 % faster, masks
    unchanged (IoU 0.99 with fp32; benchmarks/latency.py prints it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def cpu_bf16_setting(value: Union[str, bool, None] = "auto") -> bool:
    """Resolve the CPU bf16 choice (``SMARTSAM_CPU_BF16`` / ``--cpu-bf16``): "auto" (on where the
    CPU has AMX or AVX512-BF16), "on"/"off" or a bool."""
    if isinstance(value, bool):
        return value
    v = (value or "auto").strip().lower()
    if v not in ("auto", "on", "off"):
        raise ValueError(f"SMARTSAM_CPU_BF16 must be auto, on or off, not {v!r}")
    return cpu_has_fast_bf16() if v == "auto" else v == "on"


class Backbone:
    """Base class: embedding cache, batching and counters; adapters fill in four hooks.

    Subclasses implement ``_encode(image) -> state``, ``_activate(state)``,
    ``_decode(group, multimask) -> (low_res (B, M, g, g) tensor, scores (B, M) tensor)`` and
    ``_frame(image_hw)``, and upsample with ``_upsample``. ``grid`` (``g``) is the side of the
    decoder's low-resolution logits: 256 for SAM, SAM 2.1 and HQ-SAM, 288 for SAM 3.

    Args:
        name: registry name of the model (shown in results and logs).
        cache_size: how many image embeddings to keep (LRU). One SAM ViT embedding is about
            4 MB, a SAM 2.1 one about 16 MB (with its high-resolution features).
        device: "cuda" or "cpu"; default: CUDA when present.
        decode_chunk: prompts per decoder forward pass. A batch is still one decoder call, but on
            a CPU it runs in chunks: the decoder's (B, 256, 64, 64) intermediates then stay in cache
            (``benchmarks/latency.py`` prints the effect; on 2 cores chunks of 2-4 took about 60 % of
            one pass). Default: 2 on CPU (measured fastest, see README), everything at once on CUDA.
        cpu_bf16: "auto" (bf16 autocast where the CPU has bf16 hardware), "on", "off" or a bool.
    """

    grid: int = 256  # side of the low-resolution logit grid
    # Whether the paper's literal agent was measured within the 2.5 s click target on a CPU with
    # bf16 arithmetic and the shared decoder (smartsam.agent.fast_path_by_default): set by the
    # adapters where benchmarks/latency.py measured it (SAM 2.1, SAM).
    literal_within_target_on_cpu: bool = False

    def __init__(self, name: str, cache_size: int = 8, device: Optional[str] = None, decode_chunk: Optional[int] = None,
                 cpu_bf16: Union[str, bool] = "auto") -> None:
        self.name = name
        self.device = torch.device(device or default_device())
        self.cache_size = int(cache_size)
        self._cache: "OrderedDict[str, Embedding]" = OrderedDict()
        self._current: Optional[Embedding] = None
        # One caller at a time per model: the predictors keep per-image state (the backend's
        # scheduler thread is the only caller there; the lock guards library users with threads).
        self.lock = threading.RLock()
        self.decode_chunk = decode_chunk or (2 if self.device.type == "cpu" else ONE_PASS)
        self.encoder_calls = 0
        self.decoder_calls = 0  # logical calls: one per prompt kind per predict() / decode_rows()
        self.decoder_passes = 0  # forward passes (chunks) behind them
        self.random_weights = False
        self.disk_cache = None  # an EmbeddingDiskCache: embeddings survive restarts and are shared
        self.disk_hits = 0
        self.cache_id = name  # which weights made an embedding (the disk cache's folder)
        # bf16 autocast on the CPU where it has bf16 hardware (cpu_bf16="off" to disable)
        self.cpu_bf16 = self.device.type == "cpu" and cpu_bf16_setting(cpu_bf16)

    # -- image -----------------------------------------------------------------------------
    def embed(self, image: np.ndarray, key: Optional[str] = None) -> Embedding:
        """Encode ``image`` (``(H, W, 3)`` uint8 RGB) unless cached; the :class:`Embedding` handle.

        A second call with the same pixels (or the same ``key``) costs no encoder call.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        key = key or image_key(image)
        with self.lock:
            emb = self._cache.get(key)
            if emb is None:
                state = None
                if self.disk_cache is not None:
                    state = self.disk_cache.get(self.cache_id, key, self.device)
                    self.disk_hits += state is not None
                if state is None:
                    state = self._encode(image)
                    self.encoder_calls += 1
                    if self.disk_cache is not None:
                        self.disk_cache.put(self.cache_id, key, state)
                emb = Embedding(key, (int(image.shape[0]), int(image.shape[1])), state)
                self._cache[key] = emb
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return emb

    # Adapters that encode several new images in one encoder call (``_encode_batch``) set this where
    # it pays (a GPU); a CPU encodes a batch no faster than its images one by one.
    batch_encode = False

    def embed_many(self, images: Sequence[np.ndarray], keys: Sequence[Optional[str]]) -> Tuple[List[Embedding], List[bool]]:
        """:meth:`embed` for several images: the new ones in one encoder call where the adapter
        can (:attr:`batch_encode`). Returns the embeddings and which of them were encoded now."""
        keys = [k or image_key(np.asarray(im)) for im, k in zip(images, keys)]
        with self.lock:
            new: Dict[str, np.ndarray] = {}
            for im, k in zip(images, keys):
                if k not in self._cache and k not in new:
                    new[k] = im
            if self.batch_encode and len(new) > 1 and self.disk_cache is None:
                states = self._encode_batch([np.asarray(im) for im in new.values()])
                self.encoder_calls += 1
                for (k, im), state in zip(new.items(), states):
                    self._cache[k] = Embedding(k, (int(im.shape[0]), int(im.shape[1])), state)
                while len(self._cache) > max(self.cache_size, len(new)):
                    self._cache.popitem(last=False)
            out = [self.embed(im, k) for im, k in zip(images, keys)]
        seen, fresh = set(), []
        for k in keys:  # an image encoded now counts once, for its first job
            fresh.append(k in new and k not in seen)
            seen.add(k)
        return out, fresh

    def cached(self, key: str) -> bool:
        """Whether the image with this key is encoded already (in memory)."""
        return key in self._cache

    def set_image(self, image: np.ndarray, key: Optional[str] = None) -> str:
        """Make ``image`` (``(H, W, 3)`` uint8 RGB) current; encode it unless cached.

        Returns the image's cache key. A second call with the same pixels costs no encoder call.
        """
        with self.lock:
            emb = self.embed(image, key)
            self._use(emb)
        return emb.key

    def _use(self, emb: Embedding) -> None:
        self._current = emb
        self._activate(emb.state, emb.image_hw)

    @contextlib.contextmanager
    def using(self, emb: Embedding):
        """``emb`` is the current image inside the block (frames, upsampling), the previous after."""
        with self.lock:
            prev = self._current
            if prev is not emb:
                self._use(emb)
            try:
                yield self
            finally:
                if prev is not None and self._current is not prev:
                    self._use(prev)

    @property
    def image_hw(self) -> Tuple[int, int]:
        if self._current is None:
            raise RuntimeError("call set_image() first")
        return self._current.image_hw

    @property
    def frame(self) -> LowResFrame:
        return self._frame(self.image_hw)

    # -- prompts ---------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, prompts: Sequence[Prompt], multimask: bool) -> DecodeResult:
        """Decode a batch of prompts on the current image.

        Args:
            prompts: B prompts (see :class:`Prompt`); their order is kept in the output.
            multimask: True for SAM's 3 masks per prompt, False for 1.

        Returns:
            :class:`DecodeResult` with ``(B, M, g, g)`` logits and ``(B, M)`` scores. One
            decoder call per group of prompts of the same kind, never one per prompt.
        """
        logits, scores = self.predict_tensors(prompts, multimask)
        return DecodeResult(logits.cpu().numpy(), scores.cpu().numpy(), self.frame)

    @torch.inference_mode()
    def predict_tensors(self, prompts: Sequence[Prompt], multimask: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict` with its outputs left on the device: ``(B, M, g, g)`` float32 logits
        and ``(B, M)`` float32 scores, for callers that decode again from them (chains on a GPU)."""
        if self._current is None:
            raise RuntimeError("call set_image() first")
        return self.decode_rows([self._current] * len(prompts), prompts, multimask)

    # Adapters whose _decode_multi decodes rows of several images in one pass set this.
    multi_image = False

    @torch.inference_mode()
    def decode_rows(self, embeddings: Sequence[Embedding], prompts: Sequence[Prompt], multimask: bool,
                    segments: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode B rows, each a prompt on its own image, in one decoder call per prompt kind.

        Args:
            embeddings: B :class:`Embedding` handles, the image of each row (rows of one image
                should be adjacent: a pass holds one image unless the adapter is
                :attr:`multi_image`).
            prompts: B prompts in image pixels of their row's image.
            multimask: True for SAM's 3 masks per prompt, False for 1.
            segments: B ids (a job's rows share one): where a group is decoded in chunks of
                :attr:`decode_chunk` (a CPU), a chunk never mixes two, so a job's rows are
                computed exactly as they would be alone (which rows share a chunk changes the
                last bits).

        Returns:
            ``(B, M, g, g)`` float32 logits and ``(B, M)`` float32 scores on the device, in row order.
        """
        if len(prompts) == 0:
            raise ValueError("no prompts")
        if len(embeddings) != len(prompts) or (segments is not None and len(segments) != len(prompts)):
            raise ValueError("one embedding (and segment) per prompt")
        for p in prompts:
            if p.mask_input is not None and tuple(np.shape(p.mask_input)) != (self.grid, self.grid):
                raise ValueError(f"mask_input is {np.shape(p.mask_input)}; {self.name} takes ({self.grid}, {self.grid}) logits")
        m = 3 if multimask else 1
        out_logits = torch.empty((len(prompts), m, self.grid, self.grid), dtype=torch.float32, device=self.device)
        out_scores = torch.empty((len(prompts), m), dtype=torch.float32, device=self.device)
        groups: Dict[Tuple[bool, bool], List[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.kind, []).append(i)
        with self.lock:
            prev = self._current
            try:
                for idx in groups.values():
                    self.decoder_calls += 1
                    for part in self._passes(idx, embeddings, segments):
                        embs = [embeddings[i] for i in part]
                        rows = [prompts[i] for i in part]
                        if all(e is embs[0] for e in embs):
                            if self._current is not embs[0]:
                                self._use(embs[0])
                            logits, scores = self._decode(rows, multimask)
                        else:
                            logits, scores = self._decode_multi(embs, rows, multimask)
                        self.decoder_passes += 1
                        out_logits[part] = logits.float().to(self.device)
                        out_scores[part] = scores.float().to(self.device)
            finally:
                if prev is not None and self._current is not prev:
                    self._use(prev)
        return out_logits, out_scores

    def _passes(self, idx: List[int], embeddings: Sequence[Embedding], segments: Optional[Sequence[int]]):
        """Split one group's rows into forward passes: at most :attr:`decode_chunk` rows, never
        across two images unless the adapter decodes several at once, and, where the group is
        decoded in chunks (a CPU), never across two segments: a job's chunks are then the ones it
        has alone. Where a backbone decodes a group in one pass (CUDA) it is one pass, every job's
        rows side by side (the same answers up to the last bits of bf16)."""
        chunked = self.decode_chunk < ONE_PASS
        part: List[int] = []
        for i in idx:
            if part and (len(part) >= self.decode_chunk
                         or (chunked and segments is not None and segments[i] != segments[part[-1]])
                         or (not self.multi_image and embeddings[i] is not embeddings[part[-1]])):
                yield part
                part = []
            part.append(i)
        if part:
            yield part

    def _decode_multi(self, embeddings: Sequence[Embedding], prompts: Sequence[Prompt], multimask: bool):
        """One forward pass over rows of several images (adapters with :attr:`multi_image`)."""
        raise NotImplementedError  # pragma: no cover - only called when multi_image is set

    def upsample(self, low_res: np.ndarray) -> np.ndarray:
        """Low-res logits ``(N, g, g)`` -> image-size logits ``(N, H, W)`` (float32)."""
        t = torch.as_tensor(np.asarray(low_res, np.float32), device=self.device)
        return self.upsample_tensor(t).cpu().numpy()

    @torch.inference_mode()
    def upsample_tensor(self, low_res: torch.Tensor) -> torch.Tensor:
        """:meth:`upsample` on the device: ``(N, g, g)`` float32 logits -> ``(N, H, W)`` float32,
        left where they are."""
        return self._upsample(low_res.to(self.device, torch.float32)[:, None], self.image_hw)[:, 0].float()

    def compiled_step(self):
        """The compiled decoder step (:class:`~smartsam.backbones.compiled.CompiledDecoder`) this
        backbone decodes through, or None (eager): adapters with a shared decoder built with
        ``compile`` on."""
        shared = getattr(self, "shared", None)
        if shared is None or not getattr(self, "shared_decoder", False) or not shared.compiled:
            return None
        return shared.decoder(self.compute_dtype)

    # -- helpers for adapters --------------------------------------------------------------
    @staticmethod
    def _padded_points(prompts: Sequence[Prompt]) -> Tuple[np.ndarray, np.ndarray]:
        """Stack prompts' points into ``(B, N, 2)`` / ``(B, N)``, padding with label -1."""
        n = max(1, max(p.points.shape[0] for p in prompts))
        coords = np.zeros((len(prompts), n, 2), np.float32)
        labels = -np.ones((len(prompts), n), np.int64)
        for i, p in enumerate(prompts):
            k = p.points.shape[0]
            coords[i, :k] = p.points
            labels[i, :k] = p.labels
        return coords, labels

    def _mask_batch(self, prompts: Sequence[Prompt]) -> torch.Tensor:
        """The prompts' ``mask_input`` as one ``(B, 1, g, g)`` float32 tensor on the device: one
        copy for NumPy arrays, none for tensors already there."""
        ms = [p.mask_input for p in prompts]
        if all(isinstance(m, torch.Tensor) for m in ms):
            return torch.stack(ms).to(self.device, torch.float32)[:, None]
        host = [m.cpu().numpy() if isinstance(m, torch.Tensor) else m for m in ms]
        # the new axis added by torch, not NumPy (whose stride 0 there would fail a compiled
        # step's stride guards: smartsam.backbones.compiled)
        return torch.as_tensor(np.stack(host), dtype=torch.float32, device=self.device)[:, None]

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 on CUDA and on a CPU with bf16 arithmetic (``cpu_bf16``), else float32."""
        return torch.bfloat16 if self.device.type == "cuda" or self.cpu_bf16 else torch.float32

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16)

    # hooks
    def _encode(self, image: np.ndarray) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode_batch(self, images: List[np.ndarray]) -> List[Any]:  # pragma: no cover - batch_encode adapters
        raise NotImplementedError

    def _activate(self, state: Any, image_hw: Tuple[int, int]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _decode(self, prompts: Sequence[Prompt], multimask: bool):  # pragma: no cover
        raise NotImplementedError

    def _frame(self, image_hw: Tuple[int, int]) -> LowResFrame:  # pragma: no cover
        raise NotImplementedError

    def _upsample(self, low_res: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
