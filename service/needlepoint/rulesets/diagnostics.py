"""Diagnostics: what the front end finds wrong with a rule set, each at a file, line and column.

The reader and the builder never stop at the first problem: they collect :class:`Diagnostic`
objects. Loading for serving turns the errors among them into one
:class:`~needlepoint.core.ruleset.RuleSetError` that lists them all (:func:`raise_errors`);
``needlepoint rules lint`` prints them beside its own findings.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from needlepoint.core.ruleset import RuleSetError

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Diagnostic:
    """One problem. ``line`` and ``column`` are 1-based, 0 when the documents did not come from
    files (a rule set built from plain dicts). ``where`` names the document and key path as
    people read it (``parameters.yaml.inr_defer_above``, ``rules/10-bleeding.yaml:12
    DEF-INR-HIGH.then.deferral``); ``key_path`` is the path inside the rule (rules files) or the
    document, as lint shows it in brackets."""

    code: str
    severity: str  # ERROR | WARNING
    file: str
    line: int
    column: int
    where: str
    key_path: str
    message: str
    suggestion: str | None = None  # the close match a "did you mean" names, if any

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}:{self.column}" if self.line else (self.file or self.where)

    def __str__(self) -> str:
        return f"{self.location}: {self.code} {self.severity}: {self.message}"


def errors_of(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    return [d for d in diagnostics if d.severity == ERROR]


def raise_errors(diagnostics: Iterable[Diagnostic]) -> None:
    """Raise one :class:`RuleSetError` listing every error, each with its file:line:col; its
    ``where`` and first line are the first error's. Nothing when there are no errors."""
    errors = errors_of(diagnostics)
    if not errors:
        return
    first = errors[0]
    message = first.message + (f" ({first.location})" if first.line else "")
    if len(errors) > 1:
        more = len(errors) - 1
        message += f"\nand {more} more error{'s' if more > 1 else ''}:\n" + "\n".join(f"  {_line(d)}" for d in errors[1:])
    raise RuleSetError(first.where, message, tuple(errors))


def _line(d: Diagnostic) -> str:
    """``file:line:col: message [key path]`` (``where: message`` without a position)."""
    if not d.line:
        return f"{d.where}: {d.message}"
    return f"{d.location}: {d.message}" + (f" [{d.key_path}]" if d.key_path else "")


# --- wording shared by every message ----------------------------------------------------------


def describe(value: Any) -> str:
    """A value as a message names it: ``the string 'x'``, ``the number 3``, ``a mapping``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def close_match(name: Any, choices: Iterable[Any]) -> str | None:
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return match[0] if match else None


def suggest(name: Any, choices: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    match = close_match(name, choices)
    return f" (did you mean {match!r}?)" if match else ""


_SUGGESTION = re.compile(r" \(did you mean '((?:[^'\\]|\\.)*)'\?\)")


def suggestion_in(message: str) -> str | None:
    """The close match that a message made with :func:`suggest` names, if any."""
    m = _SUGGESTION.search(message)
    return m.group(1) if m else None
