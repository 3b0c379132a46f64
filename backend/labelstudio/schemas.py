"""The request bodies the backend accepts, as schemas (pydantic): every body is parsed against one
before anything reads it, so a field of the wrong type or shape is refused with a message that
names it (``params.context.result[0].value.keypointlabels: Input should be a valid list``)
instead of surfacing as a crash deep in the code.

The schemas check what the backend reads and leave the rest alone: Label Studio adds fields
between releases and sends more than we use, so unknown fields are kept and ignored. Values are
checked for their type and that numbers are finite (Python's JSON reader accepts ``NaN``,
``Infinity`` and ``1e400``); meaning (a label among the config's, a click inside the image) is
checked where it is used, with the image's size at hand.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Optional, Type, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from backend.errors import RequestError

Finite = Annotated[float, Field(allow_inf_nan=False)]
Id = Annotated[StrictInt, Field(ge=0, le=(1 << 63) - 1)]
DigitString = Annotated[StrictStr, Field(pattern=r"^[0-9]{1,18}$")]  # an id written as text


class Lax(BaseModel):
    """Unknown fields are kept and ignored; known ones are checked."""

    model_config = ConfigDict(extra="allow")


class RegionValue(Lax):
    # a click's x/y may be NaN here: the agent refuses it with its own message ("not a finite point")
    x: Optional[float] = None
    y: Optional[float] = None
    width: Optional[Finite] = None
    height: Optional[Finite] = None
    keypointlabels: Optional[List[StrictStr]] = None
    rectanglelabels: Optional[List[StrictStr]] = None


class ContextRegion(Lax):
    """One region of Label Studio's interactive context: a smart keypoint or rectangle."""

    type: StrictStr = ""
    value: RegionValue
    original_width: Optional[Finite] = None  # a positive whole number of pixels (backend.labelstudio.prompts.positive_size)
    original_height: Optional[Finite] = None
    is_positive: Optional[StrictBool] = None
    from_name: Optional[StrictStr] = None


class Context(Lax):
    result: Optional[List[Any]] = None  # each checked as a ContextRegion where the prompt is read


class Params(Lax):
    context: Optional[Union[Context, None]] = None


class Task(Lax):
    id: Optional[Union[StrictInt, StrictStr]] = None
    data: Optional[Dict[str, Any]] = None


class PredictBody(Lax):
    """``POST /predict`` (label-studio-ml's protocol)."""

    tasks: List[Any] = Field(default_factory=list)  # each one's shape is checked per task (one bad task fails alone)
    project: Optional[Union[StrictStr, StrictInt]] = None
    label_config: Optional[StrictStr] = None
    params: Optional[Params] = None


class SetupBody(Lax):
    """``POST /setup``: Label Studio's Connect check."""

    project: Optional[Union[StrictStr, StrictInt]] = None
    schema_: Optional[StrictStr] = Field(None, alias="schema")
    extra_params: Optional[Union[Dict[str, Any], StrictStr]] = None


class WebhookBody(Lax):
    """``POST /webhook``: a notice; the ids it names are read back from Label Studio."""

    action: StrictStr
    # any shape: label-studio-ml answers annotation events 201 whatever they carry, and only the
    # integer ids in them are taken (backend.server._ids); a notice is read back from Label Studio
    annotation: Any = None
    annotations: Any = None
    project: Any = None


class ReferenceBody(Lax):
    """``PUT /admin/references/<project>/<label>``: one of a text, an image (+ mask), a task."""

    text: Optional[StrictStr] = Field(None, max_length=10_000)
    image_b64: Optional[StrictStr] = None
    mask_b64: Optional[StrictStr] = None
    task: Optional[Union[Id, DigitString]] = None
    annotation: Optional[Union[Id, DigitString]] = None


def project_key(project) -> Optional[str]:
    """Label Studio sends "<id>.<created-timestamp>"; references are kept per project id. None
    when the request names no project (the SDK, scripts): pure-IS for that request."""
    if project is None or project == "":
        return None
    key = str(project).split(".")[0]
    if not (key.isascii() and key.isdigit()) or len(key) > 18:  # "²".isdigit() is true
        raise RequestError(f"project must be a Label Studio project id, got {str(project)[:40]!r}")
    return key


M = TypeVar("M", bound=BaseModel)


def parse(model: Type[M], data: Any, where: str = "") -> M:
    """``data`` as ``model``; RequestError naming each field that is wrong (the first three)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestError(describe(e, where)) from None


def describe(e: ValidationError, where: str = "") -> str:
    parts = []
    for err in e.errors(include_url=False, include_input=False)[:3]:
        loc = where
        for p in err["loc"]:
            loc += f"[{p}]" if isinstance(p, int) else (f".{p}" if loc else str(p))
        parts.append(f"{loc or 'the body'}: {err['msg']}")
    more = e.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
