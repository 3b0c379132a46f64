"""Decoding the same prompts through a backbone's library module and its shared decoder."""

from __future__ import annotations

from typing import Dict, List, Tuple


def decode_every_way(bb, prompts, multimask: bool, calls: List[int]) -> Dict[Tuple[bool, bool], object]:
    """``bb.predict(prompts, multimask)`` by the library's mask decoder module in fp32 and by
    the shared decoder in fp32 and in bf16, keyed ``(shared, bf16)``; ``calls`` grows with each
    run of the module (a forward hook's list), which must run exactly when the shared decoder is
    off. Leaves ``bb.shared_decoder`` and ``bb.cpu_bf16`` as the last run set them."""
    out = {}
    for shared, bf16 in [(False, False), (True, False), (True, True)]:
        bb.shared_decoder, bb.cpu_bf16 = shared, bf16
        n = len(calls)
        out[shared, bf16] = bb.predict(prompts, multimask)
        assert (len(calls) > n) == (not shared)  # the library module runs only when off
    return out
