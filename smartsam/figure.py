"""The "How SmartSAM works" figure: click, sampled prompts, a few chains, the chosen mask."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .agent import AgentResult


def explain_figure(image: np.ndarray, click: Tuple[float, float], result: AgentResult, out: str,
                   backbone: str, random_weights: bool, n_chains: int = 4) -> None:
    """Write a 2x3 panel PNG explaining ``result`` (which must carry its candidates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.candidates is None or result.prompts is None:
        raise ValueError("explain_figure needs a result made with return_candidates=True")
    frame_h, frame_w = image.shape[:2]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.2))
    title = f"SmartSAM on {backbone}" + (" (RANDOM weights: shows the mechanics, not quality)" if random_weights else "")
    fig.suptitle(title, fontsize=11)

    ax = axes[0, 0]
    ax.imshow(image)
    for p in result.prompts:
        if p.kind == "box":
            x0, y0, x1, y1 = p.prompt.box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="orange", lw=1.5))
        elif p.kind == "point":
            ax.plot(*p.prompt.points[0], "o", color="yellow", ms=6, mec="k")
    ax.plot(*click, "*", color="lime", ms=16, mec="k")
    ax.set_title("1. explore: click (star), 6 points, 3 boxes")

    # Pick the longest chains, from different initial prompts where possible.
    cands = result.candidates
    ends = {}
    for i, c in enumerate(cands):
        key = (c.prompt_index, c.mask_index)
        if c.chain_step >= ends.get(key, (-1, -1))[0]:
            ends[key] = (c.chain_step, i)
    chains = sorted(ends.items(), key=lambda kv: (-kv[1][0], kv[0]))
    seen, picked = set(), []
    for key, (_, i) in chains:
        if key[0] not in seen:
            picked.append((key, i))
            seen.add(key[0])
        if len(picked) == n_chains:
            break
    import cv2

    logits = result.frame.crop(result.candidate_logits)

    def up(lg):  # for the picture only; the agent upsamples just the chosen mask
        return cv2.resize(lg, (frame_w, frame_h), interpolation=cv2.INTER_LINEAR) > 0

    for ax, (key, end) in zip(list(axes[0, 1:]) + list(axes[1, :2]), picked):
        start = next(i for i, c in enumerate(cands) if (c.prompt_index, c.mask_index) == key and c.chain_step == 0)
        m0 = up(logits[start])
        m1 = up(logits[end])
        ax.imshow(image)
        ax.imshow(np.ma.masked_where(~m1, m1), alpha=0.45, cmap="winter", vmin=0, vmax=1)
        ax.contour(m0, levels=[0.5], colors="red", linewidths=1)
        for (xy, label) in cands[end].clicks:
            ax.plot(*xy, "P" if label == 1 else "X", color="lime" if label == 1 else "red", ms=10, mec="k")
        c = cands[end]
        ax.set_title(f"2. chain from {c.prompt_kind} #{c.prompt_index}, mask {c.mask_index}: {c.chain_step} clicks\n"
                     f"red: initial, blue: refined (score {c.score:.2f})", fontsize=9)
    ax = axes[1, 2]
    ax.imshow(image)
    ax.imshow(np.ma.masked_where(~result.mask, result.mask), alpha=0.5, cmap="autumn")
    ax.plot(*click, "*", color="lime", ms=16, mec="k")
    c = result.candidate
    ax.set_title(f"3. exploit ({result.mode}): {len(cands)} candidates,\nchose {c.prompt_kind} #{c.prompt_index} "
                 f"step {c.chain_step}, score {result.score:.2f}", fontsize=9)
    for a in axes.ravel():
        a.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
