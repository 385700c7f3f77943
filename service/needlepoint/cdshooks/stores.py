"""Where feedback and decisions are kept: two small protocols, and in-memory implementations.

The service only *calls* these. With a decision log (``needlepoint serve`` keeps one by default),
:class:`LogFeedbackStore` and :class:`LogDecisionStore` put both in the database, so feedback is
committed before it is acknowledged and any worker can render any decision's page; without one,
the in-memory stores keep what one worker process has seen.

* :class:`FeedbackStore` stores the clinician's response to a card (accepted, overridden and why).
  ``add`` is idempotent: the spec lets a client send the same feedback more than once, so an item
  is keyed by a digest of its content and a repeat is acknowledged without being stored twice.
  ``add`` may be a coroutine function (a store that waits for a commit); the service awaits it.
* :class:`DecisionStore` keeps decisions by id so that the explanation page a card links to can be
  rendered later.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import orjson


@dataclass(frozen=True, slots=True)
class Feedback:
    """One feedback item as received, for one service. ``key`` identifies it for idempotency."""

    service_id: str
    card: str
    outcome: str  # accepted | overridden
    outcome_timestamp: str
    accepted_suggestions: tuple[str, ...] = ()
    override_system: str | None = None
    override_code: str | None = None
    override_display: str | None = None
    user_comment: str | None = None
    item: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)  # the item as sent

    @property
    def key(self) -> str:
        """A digest of everything the item says: the same feedback sent twice has the same key."""
        blob = orjson.dumps(
            [self.service_id, self.card, self.outcome, self.outcome_timestamp, list(self.accepted_suggestions),
             self.override_system, self.override_code, self.user_comment]
        )
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def from_json(cls, service_id: str, item: Mapping[str, Any]) -> Feedback:
        """From one already-validated element of a feedback request's ``feedback`` array."""
        reason = item.get("overrideReason") or {}
        coding = reason.get("reason") or {}
        return cls(
            service_id=service_id,
            card=item["card"],
            outcome=item["outcome"],
            outcome_timestamp=item["outcomeTimestamp"],
            accepted_suggestions=tuple(s["id"] for s in item.get("acceptedSuggestions", ())),
            override_system=coding.get("system"),
            override_code=coding.get("code"),
            override_display=coding.get("display"),
            user_comment=reason.get("userComment"),
            item=item,
        )


@runtime_checkable
class FeedbackStore(Protocol):
    """Keeps card feedback. Implementations must make ``add`` idempotent on ``Feedback.key``."""

    def add(self, feedback: Feedback) -> bool | Awaitable[bool]:
        """Store ``feedback``; True if it is new, False if the same item was stored before (or an
        awaitable of that, for a store that waits for a commit)."""
        ...


@runtime_checkable
class DecisionStore(Protocol):
    """Keeps decisions (the contract's JSON) for their explanation pages."""

    def put(self, decision: Mapping[str, Any]) -> None:
        """Keep ``decision`` under its ``decisionId`` (a repeat replaces the same content)."""
        ...

    def get(self, decision_id: str) -> Mapping[str, Any] | None:
        """The decision with this id, or None if it is not (or no longer) held."""
        ...


class InMemoryFeedbackStore:
    """A FeedbackStore in a dict, for tests and a single process. Thread-safe."""

    def __init__(self) -> None:
        self._items: dict[str, Feedback] = {}
        self._lock = threading.Lock()

    def add(self, feedback: Feedback) -> bool:
        with self._lock:
            if feedback.key in self._items:
                return False
            self._items[feedback.key] = feedback
            return True

    def items(self) -> list[Feedback]:
        """Everything stored, in arrival order."""
        with self._lock:
            return list(self._items.values())


class InMemoryDecisionStore:
    """The most recent ``capacity`` decisions of this process (least recently stored dropped first)."""

    def __init__(self, capacity: int = 2048) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, decision: Mapping[str, Any]) -> None:
        decision_id = decision.get("decisionId")
        if not isinstance(decision_id, str):
            return
        with self._lock:
            self._items[decision_id] = decision
            self._items.move_to_end(decision_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def get(self, decision_id: str) -> Mapping[str, Any] | None:
        with self._lock:
            return self._items.get(decision_id)


class LogFeedbackStore:
    """Feedback into the decision log (``needlepoint.decisionlog.store.FeedbackStore``), where the
    overrides report reads it. ``add`` is a coroutine: it returns once the item is committed.
    The log checks the item again (cds-fb-1..3) and keys repeats by the item as sent."""

    def __init__(self, decision_log: Any) -> None:
        from needlepoint.decisionlog.store import FeedbackStore as LoggedFeedback

        self._store = LoggedFeedback(decision_log)

    async def add(self, feedback: Feedback) -> bool:
        if feedback.item is None:
            raise ValueError("the decision log stores feedback items as sent: build Feedback with from_json")
        return await self._store.record_feedback_async(feedback.service_id, feedback.item)


def LogDecisionStore(engine: Any) -> DecisionStore:  # noqa: N802 (a factory named like the class it returns)
    """The decision log's DecisionStore (``needlepoint.decisionlog.store.LogDecisionStore``)."""
    from needlepoint.decisionlog.store import LogDecisionStore as Store

    return Store(engine)
