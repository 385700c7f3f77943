"""The FeedbackStore the CDS Hooks service uses: store feedback, read the overrides report.

The service keeps one :class:`DecisionLog` for its decisions and hands it to a
:class:`FeedbackStore`; feedback goes through the same group-committing writer, so a
``POST .../feedback`` answered 200 means the feedback is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from needlepoint.decisionlog.report import overrides_report
from needlepoint.decisionlog.writer import DecisionLog


class FeedbackStoreLike(Protocol):
    """What a CDS Hooks feedback endpoint needs (a test double may implement just this)."""

    def record_feedback(self, service_id: str, feedback_item: Mapping[str, Any]) -> bool: ...

    def overrides(self, *, since: str | None = None, until: str | None = None) -> dict[str, Any]: ...


class FeedbackStore:
    """Feedback into the decision log, and the per-rule overrides report out of it."""

    def __init__(self, log: DecisionLog) -> None:
        self.log = log

    def record_feedback(self, service_id: str, feedback_item: Mapping[str, Any]) -> bool:
        """Store one feedback item and wait for the commit. True if stored, False if it repeats
        an item already stored (same service, same item). Raises FeedbackError (a ValueError with
        ``path``) for an item that breaks cds-fb-1..3 or lacks a required field, and
        LogUnavailable if the database cannot take it."""
        return self.log.record_feedback(service_id, feedback_item)

    async def record_feedback_async(self, service_id: str, feedback_item: Mapping[str, Any]) -> bool:
        """:meth:`record_feedback` for an event loop: waits for the commit without blocking it."""
        return await asyncio.wrap_future(self.log.submit_feedback(service_id, feedback_item))

    def overrides(self, *, since: str | None = None, until: str | None = None) -> dict[str, Any]:
        """The overrides report (see :mod:`needlepoint.decisionlog.report`)."""
        return overrides_report(self.log.engine, since=since, until=until)
