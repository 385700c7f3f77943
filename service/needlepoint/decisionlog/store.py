"""What the CDS Hooks service reads and writes through the log: feedback, the overrides report,
and decisions for their explanation pages.

The service keeps one :class:`DecisionLog` for its decisions and hands it to a
:class:`FeedbackStore`; feedback goes through the same group-committing writer, so a
``POST .../feedback`` answered 200 means the feedback is committed. :class:`LogDecisionStore`
finds a decision by its id in the log, so an explanation page can be rendered by any worker
(and after a restart), not only by the process that made the decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import Engine, select

from needlepoint.decisionlog import schema
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


class LogDecisionStore:
    """A DecisionStore (``needlepoint.cdshooks.stores``) over the log's ``decisions`` table.

    ``put`` does nothing: a road records its decisions through the writer, committed before it
    answers, so a decision whose id a caller has seen is already here. ``get`` reads the newest
    row with that id (a content-addressed id names the same decision in every row) and returns
    the contract's JSON (the stored ``needlepoint.v1.Decision`` in the protobuf JSON mapping, as
    gRPC clients see it). Blocking: async callers run it in a thread.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def put(self, decision: Mapping[str, Any]) -> None:
        """Nothing to do: the decision is in the log already (see the class docstring)."""

    def get(self, decision_id: str) -> dict[str, Any] | None:
        from google.protobuf import json_format

        from needlepoint.v1 import decision_pb2

        d = schema.decisions
        query = select(d.c.decision).where(d.c.decision_id == decision_id).order_by(d.c.id.desc()).limit(1)
        with self.engine.connect() as connection:
            blob = connection.execute(query).scalar_one_or_none()
        if blob is None:
            return None
        return json_format.MessageToDict(decision_pb2.Decision.FromString(blob))
