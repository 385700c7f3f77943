"""The decision log's writer: an in-process queue drained by one thread in group commits.

:meth:`DecisionLog.record` puts an entry on a queue and returns a ``concurrent.futures.Future``
at once; it never touches the database. A background thread takes whatever is queued (up to
``max_batch`` items; it waits ``linger`` seconds for more only if asked), turns each entry into
rows, inserts them all in one transaction and commits, then resolves every future of the batch.
While one commit runs, new entries queue up and go into the next: under load many requests share
one commit, and an idle log commits each entry alone without waiting for company.

**Acknowledgement.** A road must not answer before its entry's future resolves: the gRPC servicer
awaits it (``await asyncio.wrap_future(log.record(entry))``, which blocks no other request), so
a decision a caller has received is a committed row, and survives ``kill -9`` of the server (and,
with SQLite ``synchronous=FULL`` or PostgreSQL's default ``fsync``, of the machine). The cost is
the wait for the next group commit (see the README's "Decision log" for figures). If the log
cannot commit (the database is down, the queue is full), the future fails with
:class:`LogUnavailable` and the road answers with an error instead of an unlogged decision.

A failed batch is retried entry by entry, each in its own transaction, so one bad entry (e.g. a
card uuid logged twice) fails alone.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Insert, insert
from sqlalchemy.exc import SQLAlchemyError

from needlepoint.decisionlog import database, schema
from needlepoint.decisionlog.entries import DecisionEntry, utc_text
from needlepoint.decisionlog.feedback import feedback_row
from needlepoint.decisionlog.masking import Masker

log = logging.getLogger(__name__)


def _settle(future: concurrent.futures.Future, result: Any = None, *, exc: BaseException | None = None) -> None:
    """Resolve a future unless its waiter has given up: a gRPC call cancelled by its deadline
    cancels the asyncio future that wraps it, and with it this one. The row is committed all the
    same; only the answer is not delivered."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class LogUnavailable(RuntimeError):
    """The decision log could not commit an entry (database error, full queue, log closed)."""


class NotMigrated(RuntimeError):
    """The database is not at the schema this code writes; run ``needlepoint decisions migrate``."""


@dataclass(slots=True)
class _Item:
    kind: str  # decision | feedback | barrier | stop
    future: concurrent.futures.Future
    entry: DecisionEntry | None = None
    service_id: str = ""
    feedback: Any = None


class DecisionLog:
    """Group-committing writer of decisions and feedback to the database at ``url``.

    ``max_queue`` bounds the memory held by entries not yet committed (beyond it ``record`` fails
    at once); ``max_batch`` bounds one transaction; ``linger`` (seconds, default 0) makes the
    writer wait for more entries before a commit, which only adds latency unless commits are
    very expensive.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        masker: Masker | None = None,
        max_batch: int = 500,
        max_queue: int = 50_000,
        linger: float = 0.0,
    ) -> None:
        self.url = database.normalize_url(url)
        self.engine = database.connect(self.url)
        revision = database.current_revision(self.engine)
        if revision != database.HEAD:
            self.engine.dispose()
            raise NotMigrated(
                f"the decision log at {database.redacted(self.url)} is at schema {revision or 'none'}, not {database.HEAD}: "
                "run `needlepoint decisions migrate`"
            )
        self.masker = masker or Masker()
        self._max_batch = max_batch
        self._linger = linger
        self._queue: queue.Queue[_Item] = queue.Queue(max_queue)
        self._closed = False
        self.commits = 0  # transactions committed (for measurement)
        self.committed = 0  # decisions committed
        self._thread = threading.Thread(target=self._run, name="decision-log-writer", daemon=True)
        self._thread.start()

    # -- the roads' side ------------------------------------------------------------------------

    def record(self, entry: DecisionEntry) -> concurrent.futures.Future:
        """Queue ``entry``; a future that resolves to its row id once committed (or fails with
        :class:`LogUnavailable`). Never waits for the database."""
        return self._put(_Item("decision", concurrent.futures.Future(), entry=entry))

    def record_feedback(self, service_id: str, item: Mapping[str, Any], timeout: float | None = 30.0) -> bool:
        """Store one CDS Hooks feedback item for ``service_id`` and wait for the commit: True if
        stored, False if it repeats one already stored. Raises
        :class:`~needlepoint.decisionlog.feedback.FeedbackError` for an item that breaks the
        specification, :class:`LogUnavailable` if it cannot be stored."""
        return self.submit_feedback(service_id, item).result(timeout)

    def submit_feedback(self, service_id: str, item: Mapping[str, Any]) -> concurrent.futures.Future:
        """:meth:`record_feedback` without the wait (for asyncio callers: ``await
        asyncio.wrap_future(...)``). The item is checked here, before it is queued."""
        row = feedback_row(service_id, item, received_at=utc_text(dt.datetime.now(dt.timezone.utc)))
        return self._put(_Item("feedback", concurrent.futures.Future(), service_id=service_id, feedback=row))

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until everything queued before this call is committed (or has failed)."""
        self._put(_Item("barrier", concurrent.futures.Future())).result(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Commit what is queued, stop the writer, release the database. Idempotent."""
        if self._closed:
            return
        stop = _Item("stop", concurrent.futures.Future())
        self._queue.put(stop)  # blocking put: a full queue drains, and stop must not be lost
        self._closed = True
        stop.future.result(timeout)
        self._thread.join(timeout)
        self.engine.dispose()

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, item: _Item) -> concurrent.futures.Future:
        if self._closed:
            _settle(item.future, exc=LogUnavailable("the decision log is closed"))
            return item.future
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            _settle(item.future, exc=LogUnavailable("the decision log is behind: its queue is full"))
        return item.future

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._take()
            stop = next((item for item in batch if item.kind == "stop"), None)
            work = [item for item in batch if item.kind in ("decision", "feedback")]
            try:
                if work:
                    self._write(work)
            except Exception as exc:  # a fault of ours: fail this batch, keep the writer alive
                log.exception("decision log: the writer failed on a batch")
                for item in work:
                    _settle(item.future, exc=LogUnavailable(f"the decision log failed: {exc.__class__.__name__}"))
            for item in batch:
                if item.kind in ("barrier", "stop"):
                    _settle(item.future, None)
            if stop is not None:
                return

    def _take(self) -> list[_Item]:
        """The next batch: block for one item, then take what is queued (lingering if asked)."""
        batch = [self._queue.get()]
        deadline = time.monotonic() + self._linger
        while len(batch) < self._max_batch and batch[-1].kind != "stop":
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
        return batch

    def _write(self, work: list[_Item]) -> None:
        """Prepare rows, commit the batch in one transaction, resolve the futures; on failure,
        retry each item alone."""
        prepared: list[tuple[_Item, dict[str, Any]]] = []
        for item in work:
            try:
                if item.kind == "decision":
                    assert item.entry is not None  # record() queues every decision with its entry
                    row = item.entry.row(self.masker)
                else:
                    row = item.feedback
            except Exception as exc:  # a malformed entry fails alone
                log.exception("decision log: cannot prepare an entry")
                _settle(item.future, exc=LogUnavailable(f"cannot log this entry: {exc.__class__.__name__}"))
                continue
            prepared.append((item, row))
        if not prepared:
            return
        try:
            results = self._commit(prepared)
        except SQLAlchemyError as exc:
            if len(prepared) == 1:
                self._fail(prepared, exc)
                return
            log.warning("decision log: a batch of %d failed (%s); retrying one by one", len(prepared), exc.__class__.__name__)
            for one in prepared:
                try:
                    results_one = self._commit([one])
                except SQLAlchemyError as exc_one:
                    self._fail([one], exc_one)
                else:
                    _settle(one[0].future, results_one[0])
            return
        for (item, _), result in zip(prepared, results, strict=True):
            _settle(item.future, result)

    def _fail(self, prepared: list[tuple[_Item, dict[str, Any]]], exc: Exception) -> None:
        log.error("decision log: cannot commit %d item(s): %s", len(prepared), exc.__class__.__name__)
        for item, _ in prepared:
            _settle(item.future, exc=LogUnavailable(f"the decision log cannot commit: {exc.__class__.__name__}"))

    def _commit(self, prepared: list[tuple[_Item, dict[str, Any]]]) -> list[Any]:
        """One transaction for the whole batch; per item, the decision's row id or, for
        feedback, whether it was new."""
        results: list[Any] = [None] * len(prepared)
        decisions = [(k, row) for k, (item, row) in enumerate(prepared) if item.kind == "decision"]
        with self.engine.begin() as connection:
            if decisions:
                columns = [c.name for c in schema.decisions.columns if c.name != "id"]
                rows = [{name: row[name] for name in columns} for _, row in decisions]
                statement = insert(schema.decisions).returning(schema.decisions.c.id, sort_by_parameter_order=True)
                ids = [r[0] for r in connection.execute(statement, rows)]
                fired = [
                    {"decision_row": i, "rule_id": rule}
                    for i, (_, row) in zip(ids, decisions, strict=True)
                    for rule in row["fired"]
                ]
                cards = [{"decision_row": i, **card} for i, (_, row) in zip(ids, decisions, strict=True) for card in row["cards"]]
                if fired:
                    connection.execute(insert(schema.fired_rules), fired)
                if cards:
                    connection.execute(insert(schema.cards), cards)
                for (k, _), row_id in zip(decisions, ids, strict=True):
                    results[k] = row_id
            for k, (item, row) in enumerate(prepared):
                if item.kind == "feedback":
                    results[k] = self._insert_feedback(connection, row)
        self.commits += 1
        self.committed += len(decisions)
        return results

    def _insert_feedback(self, connection: Connection, row: dict[str, Any]) -> bool:
        """Insert unless an item with the same idempotency key is stored: True if inserted."""
        key = ["idempotency_key"]
        statement: Insert
        if connection.dialect.name == "postgresql":
            from sqlalchemy.dialects import postgresql

            statement = postgresql.insert(schema.feedback).values(**row).on_conflict_do_nothing(index_elements=key)
        else:
            from sqlalchemy.dialects import sqlite

            statement = sqlite.insert(schema.feedback).values(**row).on_conflict_do_nothing(index_elements=key)
        return connection.execute(statement.returning(schema.feedback.c.id)).first() is not None
