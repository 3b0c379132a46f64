"""What the agent answers: :class:`AgentResult` and the provenance of each mask, :class:`Candidate`
(a leaf module: the batch engine makes them, the agent and its callers read them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .clickers import ADD, action_name
from .masks import LowResFrame


@dataclass
class Candidate:
    """One mask the agent produced, and where it came from.

    Attributes:
        prompt_index: which initial prompt (0 = the user's click, then points, then boxes).
        prompt_kind: "click", "point" or "box" (or "refine" for outer interactions).
        mask_index: which of SAM's 3 multimask outputs started the chain.
        chain_step: 0 for the initial mask, k for the mask after the chain's k-th click.
        clicks: the chain's clicks so far, ``((x, y), label)`` with label 1 Add, 0 Cut.
        score: the decoder's IoU prediction.
    """

    prompt_index: int
    prompt_kind: str
    mask_index: int
    chain_step: int
    clicks: Tuple[Tuple[Tuple[float, float], int], ...]
    score: float

    @property
    def actions(self) -> Tuple[str, ...]:
        """The chain's inner clicks in order, "Add" or "Cut" (paper Table 7)."""
        return tuple("Add" if label == ADD else "Cut" for _, label in self.clicks)

    @property
    def action(self) -> str:
        """Which actions made this mask: "no action", "Add", "Cut" or "Add&Cut"."""
        return action_name([label for _, label in self.clicks])

    def describe(self) -> str:
        """``<prompt kind>:<A|C per inner click>``, e.g. ``box:AC`` (``click:`` for an initial mask)."""
        return f"{self.prompt_kind}:" + "".join(a[0] for a in self.actions)


@dataclass
class AgentResult:
    """The agent's answer.

    Attributes:
        mask: ``(H, W)`` bool, the chosen mask at image size.
        score: its IoU-head score.
        similarity: cosine similarity to the reference (None in pure-IS mode).
        mode: "pure-is", "reference-mask", "reference-image", "reference-text" or "refine".
        candidate: provenance of the chosen mask.
        low_res_logits: ``(g, g)`` logits of the chosen mask (``g``: the backbone's grid; feed to the next click).
        candidates: every candidate (only when asked for), with ``candidate_logits``
            ``(K, g, g)`` and ``candidate_scores`` ``(K,)``.
        timings: seconds spent per stage.
        calls: encoder / decoder / feature calls made for this answer.
    """

    mask: np.ndarray
    score: float
    similarity: Optional[float]
    mode: str
    candidate: Candidate
    low_res_logits: np.ndarray
    candidates: Optional[List[Candidate]] = None
    candidate_logits: Optional[np.ndarray] = field(default=None, repr=False)
    candidate_scores: Optional[np.ndarray] = None
    prompts: Optional[list] = None
    frame: Optional[LowResFrame] = None
    timings: Dict[str, float] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)
    # True when a deadline cut the chains short: the answer is the best of what was explored.
    partial: bool = False
    # "fast" (near-duplicate chains pruned) or "literal" (every chain, as the paper); "refine" / "box"
    # answers carry the path of the agent that made them
    path: str = "literal"
