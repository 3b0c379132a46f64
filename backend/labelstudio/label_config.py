"""A project's labeling config, as SmartSAM reads it: one parser for the model class, ``/setup``
(Label Studio's Connect check) and the project evaluation.

Parsed with ``label_studio_sdk.label_interface.LabelInterface`` (it knows every tag, its
``toName`` and its labels). SmartSAM needs an ``<Image>`` with a ``$key`` into the task data,
a smart ``KeyPointLabels`` or ``RectangleLabels`` on it (the prompts: only smart tools reach the
backend), and answer tags on it whose labels cover the prompt labels: any of ``BrushLabels``
(RLE), ``PolygonLabels``, ``BitmaskLabels`` (a PNG) and a non-smart ``RectangleLabels`` (the
answer's box). Every answer carries one region per answer tag that has its label.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

from backend.errors import RequestError

REFERENCE_CHOICE = "Use as reference"
# A smart KeyPointLabels of this name answers with the clicked object and every instance like it
ALL_LIKE_THIS = "all_like_this"
PROMPT_TAGS = ("KeyPointLabels", "RectangleLabels")
ANSWER_TAGS = ("BrushLabels", "PolygonLabels", "BitmaskLabels", "RectangleLabels")  # RectangleLabels: non-smart
# the region ``type`` of each answer tag, as Label Studio writes it
REGION_TYPES = {"BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels", "BitmaskLabels": "bitmasklabels",
                "RectangleLabels": "rectanglelabels"}


@dataclass(frozen=True)
class PromptTool:
    """A smart prompt tool of the config: its name, tag and labels."""

    name: str
    tag: str
    labels: Tuple[str, ...]


@dataclass(frozen=True)
class AnswerTag:
    """An answer tag of the config: its name (``from_name``), tag and labels."""

    name: str
    tag: str
    labels: Tuple[str, ...]

    @property
    def type(self) -> str:
        return REGION_TYPES[self.tag]


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs from a project's labeling config.

    Attributes:
        image_name: the ``<Image name>`` the answers are drawn on (``to_name``).
        image_key: the task data key holding the image (``$image`` -> ``image``).
        answers: the answer tags on that image, in the config's order.
        prompts: the smart prompt tools on that image.
    """

    image_name: str
    image_key: str
    answers: Tuple[AnswerTag, ...]
    prompts: Tuple[PromptTool, ...] = ()

    @property
    def labels(self) -> Tuple[str, ...]:
        """Every answer label, in the config's order (a label in several tags once)."""
        out: List[str] = []
        for a in self.answers:
            out += [lb for lb in a.labels if lb not in out]
        return tuple(out)

    def answers_for(self, label: str) -> Tuple[AnswerTag, ...]:
        """The answer tags a region of ``label`` is given in."""
        return tuple(a for a in self.answers if label in a.labels)

    def answer_tag(self, from_name: str) -> Optional[AnswerTag]:
        return next((a for a in self.answers if a.name == from_name), None)

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

    def answer(c) -> bool:  # a smart RectangleLabels is a prompt, a plain one an answer
        return c.tag in ANSWER_TAGS and not (c.tag == "RectangleLabels" and smart(c))

    problems: List[str] = []
    best = None
    for image in images:
        answers = [c for c in li.controls if answer(c) and on(c, image)]
        prompts = [c for c in li.controls if c.tag in PROMPT_TAGS and on(c, image) and smart(c)]
        if answers and (prompts or not need_prompts):
            best = (image, answers, prompts)
            break
    if best is None:
        image = images[0]
        if not any(answer(c) and on(c, image) for c in li.controls):
            problems.append("no answer tag on the image: SmartSAM answers in <BrushLabels>, <PolygonLabels>, "
                            "<BitmaskLabels> or a non-smart <RectangleLabels>; add one with the prompt labels")
        if need_prompts and not any(c.tag in PROMPT_TAGS and on(c, image) and smart(c) for c in li.controls):
            problems.append('no smart <KeyPointLabels> or <RectangleLabels> (smart="true") on the image: the clicks that '
                            "reach the backend come from smart tools")
        return None, tuple(problems)
    image, answers, prompts = best
    value = image.value or ""
    if not value.startswith("$") or len(value) < 2:
        return None, ("the <Image> takes no $value from the task data (e.g. value=\"$image\")",)
    tags = tuple(AnswerTag(c.name, c.tag, tuple(c.labels or ())) for c in answers)
    covered = set().union(set(), *(set(a.labels) for a in tags))
    missing = sorted(set().union(set(), *(set(p.labels or ()) for p in prompts)) - covered)
    if missing:
        return None, (f"prompt labels {missing} are in no answer tag ({', '.join(sorted({a.tag for a in tags}))}): give "
                      f"the answer tag the same labels",)
    cfg = LabelConfig(image.name, value[1:], tags, tuple(PromptTool(p.name, p.tag, tuple(p.labels or ())) for p in prompts))
    return cfg, ()
