"""``needlepoint decisions export --since T``: past requests as NDJSON that ``rules diff --cases``
reads, so an author sees what a rule change would have done to real decisions.

Each line is a stored replay input (masked, see :mod:`needlepoint.decisionlog.masking`):

* gRPC and CLI decisions: an evaluate request, ``{"correlationId", "asOf", "fhirBundle": {...}}``
  (or ``context``, and ``order`` when the caller overrode the order). ``asOf`` is the instant the
  decision was made at, so ``rules diff`` replays it at that instant. ``correlationId`` is the
  caller's, or the decision id when the caller gave none, so the diff report names each case.
* CDS Hooks decisions: the CDS Hooks request, with an ``asOf`` member (the decision's instant).
  ``rules diff`` today evaluates CDS Hooks requests at ``--as-of`` or at the start of the run,
  not at that member; pass ``--as-of`` to replay such an export at one instant.

Lines come in the order the decisions were made; ``--since``/``--until`` bound ``created_at``.
Rows are read in pages so that an export of millions of decisions runs in constant memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

import orjson
from sqlalchemy import Engine, select

from needlepoint.decisionlog import schema

PAGE = 500


def export_lines(
    engine: Engine, *, since: str | None = None, until: str | None = None, road: str | None = None
) -> Iterator[bytes]:
    """One NDJSON line (bytes, with its newline) per logged decision in the window."""
    d = schema.decisions
    last = 0
    while True:
        columns = (d.c.id, d.c.decision_id, d.c.as_of, d.c.correlation_id, d.c.replay_kind, d.c.replay_input)
        query = select(*columns).where(d.c.id > last)
        if since:
            query = query.where(d.c.created_at >= since)
        if until:
            query = query.where(d.c.created_at < until)
        if road:
            query = query.where(d.c.road == road)
        with engine.connect() as connection:
            rows = connection.execute(query.order_by(d.c.id).limit(PAGE)).all()
        if not rows:
            return
        for row in rows:
            last = row.id
            replay = orjson.loads(row.replay_input)
            yield orjson.dumps(replay_line(row.replay_kind, replay, row.as_of, row.correlation_id or row.decision_id)) + b"\n"


def replay_line(kind: str, replay: dict, as_of: str, name: str) -> dict:
    """The exported object for one stored replay input."""
    if kind == "evaluate-request":
        line = {**replay, "correlationId": replay.get("correlationId") or name}
        if as_of:
            line["asOf"] = as_of
        return line
    return {**replay, "asOf": as_of}


def export(engine: Engine, out: IO[bytes], **window: str | None) -> int:
    """Write the export to ``out``; the number of lines written."""
    count = 0
    for line in export_lines(engine, **window):
        out.write(line)
        count += 1
    return count
