"""A project's labeling config, as SmartSAM reads it: one parser for the model class, ``/setup``
(Label Studio's Connect check) and the project evaluation.

Parsed with ``label_studio_sdk.label_interface.LabelInterface`` (it knows every tag, its
``toName`` and its labels). SmartSAM needs an ``<Image>`` with a ``$key`` into the task data,
a smart ``KeyPointLabels`` or ``RectangleLabels`` on it (the prompts: only smart tools reach the
backend), and a ``BrushLabels`` on it whose labels cover the prompt labels (the answers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .errors import RequestError

REFERENCE_CHOICE = "Use as reference"
PROMPT_TAGS = ("KeyPointLabels", "RectangleLabels")


@dataclass(frozen=True)
class PromptTool:
    """A smart prompt tool of the config: its name, tag and labels."""

    name: str
    tag: str
    labels: Tuple[str, ...]


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs from a project's labeling config.

    Attributes:
        image_name: the ``<Image name>`` the answers are drawn on (``to_name``).
        image_key: the task data key holding the image (``$image`` -> ``image``).
        brush_name: the ``<BrushLabels name>`` the answers are given in (``from_name``).
        brush_labels: its labels, in the config's order.
        prompts: the smart prompt tools on that image.
    """

    image_name: str
    image_key: str
    brush_name: str
    brush_labels: Tuple[str, ...]
    prompts: Tuple[PromptTool, ...] = ()

    @classmethod
    def parse(cls, xml, need_prompts: bool = True) -> "LabelConfig":
        """The config, or RequestError naming everything it lacks. ``need_prompts=False`` reads a
        brush project without smart tools (its annotations, for the project evaluation)."""
        cfg, problems = _parse(xml if isinstance(xml, str) else "", need_prompts)
        if problems:
            raise RequestError("SmartSAM cannot work with this labeling config: " + "; ".join(problems))
        return cfg


def check_label_config(xml) -> List[str]:
    """What a labeling config lacks for SmartSAM, as sentences (empty when it is usable)."""
    return list(_parse(xml if isinstance(xml, str) else "")[1])


@functools.lru_cache(maxsize=64)
def _parse(xml: str, need_prompts: bool = True) -> Tuple[Optional[LabelConfig], Tuple[str, ...]]:
    if not xml.strip():
        return None, ("no labeling config was sent",)
    from label_studio_sdk.label_interface import LabelInterface

    try:
        li = LabelInterface(xml)
    except Exception as e:  # the SDK raises several kinds for XML it cannot read
        return None, (f"the labeling config is not valid XML ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})",)
    images = [o for o in li.objects if o.tag == "Image" and o.name]
    if not images:
        return None, ("no <Image> tag: SmartSAM segments images",)

    def on(c, image) -> bool:
        return image.name in (c.to_name or [])

    def smart(c) -> bool:
        return any((c.attr.get(k) or "").lower() == "true" for k in ("smart", "smartOnly"))

    problems: List[str] = []
    best = None
    for image in images:
        brushes = [c for c in li.controls if c.tag == "BrushLabels" and on(c, image)]
        prompts = [c for c in li.controls if c.tag in PROMPT_TAGS and on(c, image) and smart(c)]
        if brushes and (prompts or not need_prompts):
            best = (image, brushes, prompts)
            break
    if best is None:
        image = images[0]
        if not any(c.tag == "BrushLabels" and on(c, image) for c in li.controls):
            problems.append("no <BrushLabels> on the image: SmartSAM answers with brush masks")
        if need_prompts and not any(c.tag in PROMPT_TAGS and on(c, image) and smart(c) for c in li.controls):
            problems.append('no smart <KeyPointLabels> or <RectangleLabels> (smart="true") on the image: the clicks that '
                            "reach the backend come from smart tools")
        return None, tuple(problems)
    image, brushes, prompts = best
    value = image.value or ""
    if not value.startswith("$") or len(value) < 2:
        return None, ("the <Image> takes no $value from the task data (e.g. value=\"$image\")",)
    brush = brushes[0]
    brush_labels = tuple(brush.labels or ())
    missing = sorted(set().union(set(), *(set(p.labels or ()) for p in prompts)) - set(brush_labels))
    if missing:
        return None, (f"prompt labels {missing} have no BrushLabels label of the same name: give both tags the same labels",)
    cfg = LabelConfig(image.name, value[1:], brush.name, brush_labels,
                      tuple(PromptTool(p.name, p.tag, tuple(p.labels or ())) for p in prompts))
    return cfg, ()
