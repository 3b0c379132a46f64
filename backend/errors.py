"""The backend's domain errors, at the bottom floor: every module may raise them, none imports
upward, and none of them knows HTTP. The web layer (:func:`backend.web.app.error_answer`) is the
one place that turns each into a status and an answer Label Studio understands."""

from __future__ import annotations

from typing import Optional


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


class RequestError(ValueError):
    """Bad input in a request; the message goes back to Label Studio and into the log."""


class Busy(RequestError):
    """The model stayed busy past the request's deadline."""


# Label Studio's answers that refuse for good: the resource is not there, or not ours to see.
# Anything else (no answer, a timeout, 5xx while it restarts, 401 until the key is fixed, 429) may
# pass, so work that needs it is tried again later (backend.store.work_queue).
DEFINITIVE_STATUSES = frozenset({400, 403, 404, 410})


class ImageFetchError(RuntimeError):
    """The task's image or a Label Studio resource cannot be had; the message says why and what to
    change. ``status`` is the HTTP status when the server answered with an error; ``transient``
    says whether trying again later may succeed (by default: an HTTP status other than
    :data:`DEFINITIVE_STATUSES`; without a status, only when the raiser says so: a refused
    connection or a timeout is, a refused URL scheme or an image too large is not)."""

    def __init__(self, message: str, status: Optional[int] = None, transient: Optional[bool] = None) -> None:
        super().__init__(message)
        self.status = status
        self.transient = (status is not None and status not in DEFINITIVE_STATUSES) if transient is None else transient


class Refused(RuntimeError):
    """Work not accepted now (a full queue, a database that is away); the message says why. The
    web layer answers 503: the sender may try again."""


class QueueFull(RuntimeError):
    """The model's queue holds more work of this priority than the request's deadline allows:
    refused at once, with the expected wait, instead of a request that waits and times out (the
    web layer answers 503 with it)."""

    def __init__(self, message: str, expected_wait: float) -> None:
        super().__init__(message)
        self.expected_wait = expected_wait
