"""CDS Hooks feedback, checked and turned into a ``feedback`` row.

A feedback item (CDS Hooks 2.0 §Feedback) names a card by its uuid, an ``outcome`` (``accepted``
or ``overridden``), the ``acceptedSuggestions`` when accepted, an optional ``overrideReason``
(``reason``: a Coding, ``userComment``: text) and an ``outcomeTimestamp``. The invariants are
enforced: cds-fb-1, ``acceptedSuggestions`` is present (and non-empty) exactly when the outcome
is ``accepted``; cds-fb-2, ``overrideReason`` only with ``overridden``; cds-fb-3, an
``overrideReason`` has a ``reason`` or a ``userComment``.

Feedback may arrive several times for the same card. An item is a *repeat* when the same
service already received the very same item (same card, outcome, suggestions, reason, comment
and timestamp): its idempotency key is the SHA-256 of the service id and the item's canonical
JSON, under a unique constraint. A different item for the same card (a later change of mind) is
kept; the overrides report uses each card's latest outcome.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import Any

import orjson


class FeedbackError(ValueError):
    """A feedback item that breaks the specification; ``path`` names the field."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _text(item: Mapping[str, Any], key: str, path: str, *, required: bool = True) -> str:
    value = item.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise FeedbackError(f"{path}.{key}", "a non-empty string is required" if required else "must be a string")
    return value


def _timestamp(text: str, path: str) -> str:
    """An ISO 8601 instant with a zone, as stored (UTC, milliseconds, ``Z``)."""
    from needlepoint.decisionlog.entries import utc_text

    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise FeedbackError(path, f"not an ISO 8601 instant: {text!r}") from None
    if moment.tzinfo is None:
        raise FeedbackError(path, "the instant needs a zone (e.g. Z)")
    return utc_text(moment)


def feedback_row(service_id: str, item: Any, path: str = "feedback", *, received_at: str) -> dict[str, Any]:
    """The ``feedback`` row of one item, checked. Raises :class:`FeedbackError`."""
    if not isinstance(item, Mapping):
        raise FeedbackError(path, "a feedback item is an object")
    card = _text(item, "card", path)
    outcome = _text(item, "outcome", path)
    if outcome not in ("accepted", "overridden"):
        raise FeedbackError(f"{path}.outcome", f"must be accepted or overridden, not {outcome!r}")
    when = _timestamp(_text(item, "outcomeTimestamp", path), f"{path}.outcomeTimestamp")
    accepted = item.get("acceptedSuggestions")
    accepted_ids: list[str] = []
    if outcome == "accepted":
        if (
            not isinstance(accepted, list)
            or not accepted
            or not all(isinstance(s, Mapping) and isinstance(s.get("id"), str) for s in accepted)
        ):
            raise FeedbackError(
                f"{path}.acceptedSuggestions", "an accepted card names the suggestions accepted: [{\"id\": ...}] (cds-fb-1)"
            )
        accepted_ids = [s["id"] for s in accepted]
    elif accepted:
        raise FeedbackError(f"{path}.acceptedSuggestions", "only an accepted card has accepted suggestions (cds-fb-1)")
    override = item.get("overrideReason")
    system = code = display = comment = ""
    if override is not None:
        where = f"{path}.overrideReason"
        if outcome != "overridden":
            raise FeedbackError(where, "only an overridden card has an override reason (cds-fb-2)")
        if not isinstance(override, Mapping):
            raise FeedbackError(where, "must be an object")
        reason = override.get("reason")
        comment = _text(override, "userComment", where, required=False)
        if reason is None and not comment:
            raise FeedbackError(where, "needs a reason or a userComment (cds-fb-3)")
        if reason is not None:
            if not isinstance(reason, Mapping):
                raise FeedbackError(f"{where}.reason", "must be a Coding object")
            code = _text(reason, "code", f"{where}.reason")
            system = _text(reason, "system", f"{where}.reason", required=False)
            display = _text(reason, "display", f"{where}.reason", required=False)
    canonical = orjson.dumps({"service": service_id, "item": item}, option=orjson.OPT_SORT_KEYS)
    return {
        "idempotency_key": "sha256:" + hashlib.sha256(canonical).hexdigest(),
        "service_id": service_id,
        "card_uuid": card,
        "outcome": outcome,
        "accepted_suggestions": accepted_ids,
        "reason_system": system,
        "reason_code": code,
        "reason_display": display,
        "comment": comment,
        "outcome_timestamp": when,
        "received_at": received_at,
    }
