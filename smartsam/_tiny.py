"""Helpers for the small random test models (a leaf module: the registry and the adapters both use
it, it uses neither)."""

from __future__ import annotations


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges (random CLIP only: no vocabulary to download)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[]), len(vocab)
