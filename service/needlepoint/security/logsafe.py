"""Logging that cannot carry patient data.

Two ways input reaches a log line: a value the caller chose (a correlation id may well be an MRN
or a patient's id) and the message of an exception (``ValueError: Invalid isoformat string:
'1958-04-12x'``). So the server logs a correlation id only as a digest
(:func:`correlation_ref`; the caller can compute the same digest to find its call), and its
formatter prints tracebacks with exception types and frames but without exception messages
(:class:`PhiSafeFormatter`). Log messages themselves name fields by path, never by value.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from types import TracebackType

WITHHELD = "(message withheld: it may carry patient data)"


def correlation_ref(correlation_id: str) -> str:
    """A correlation id as it may appear in a log: ``sha256:`` and the first 16 hex digits of the
    SHA-256 of its UTF-8 bytes ("-" when there is none). A pseudonym, not anonymisation: a guessable
    id can be found by hashing guesses, so logs stay access-controlled."""
    if not correlation_id:
        return "-"
    return "sha256:" + hashlib.sha256(correlation_id.encode("utf-8", "replace")).hexdigest()[:16]


class PhiSafeFormatter(logging.Formatter):
    """A formatter whose tracebacks keep the frames (file, line, code) and exception types, and
    drop exception messages, which may quote input."""

    def formatException(  # noqa: N802 - logging.Formatter's name
        self, ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
    ) -> str:
        """The traceback of ``ei`` (and of its causes and contexts), messages withheld."""
        if ei[1] is None:
            return ""
        return "".join(_render(traceback.TracebackException(*ei, capture_locals=False))).rstrip("\n")


def _render(exc: traceback.TracebackException) -> list[str]:
    """The lines of one exception and the chain before it, as the standard format but with
    ``Type: (message withheld…)`` in place of ``Type: message``."""
    lines: list[str] = []
    if exc.__cause__ is not None:
        lines += _render(exc.__cause__)
        lines.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif exc.__context__ is not None and not exc.__suppress_context__:
        lines += _render(exc.__context__)
        lines.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    if exc.stack:
        lines.append("Traceback (most recent call last):\n")
        lines.extend(exc.stack.format())
    exc_type = getattr(exc, "exc_type", None)
    name = f"{exc_type.__module__}.{exc_type.__qualname__}" if exc_type is not None else getattr(exc, "exc_type_str", "Exception")
    lines.append(f"{name}: {WITHHELD}\n")
    return lines


def install(format_string: str, logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (default: the root logger) a :class:`PhiSafeFormatter`."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.setFormatter(PhiSafeFormatter(format_string))
