"""EvaluateStream's read-ahead, in process: the window (items and bytes), every answer after its
decision's commit and in request order, and the call's deadline met while items are read ahead
(nothing committed that is not answered); and the level at which a refusal is logged (an order
not for us at DEBUG, an invalid one at INFO).

The servicer is called directly, with a small stand-in for gRPC's servicer context (a deadline, a
peer, an abort that raises), so that the test can count how many requests the servicer has read.
The decision log is a real one on SQLite; its commits can be held back."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.rpc import status_pb2
from sqlalchemy import select

from needlepoint.decisionlog import DecisionLog, migrate, schema
from needlepoint.limits import LARGE_REQUEST_BYTES
from needlepoint.server.service import Engine
from needlepoint.server.servicer import STREAM_WINDOW, STREAM_WINDOW_BYTES, DecisionServicer
from needlepoint.v1 import decision_service_pb2, patient_pb2
from needlepoint_client.errors import error_from_status
from tests.bundles import not_for_us_bundle, random_bundles
from tests.patients import AS_OF


class Aborted(Exception):
    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.code)
        self.status = status


class Context:
    """What the servicer asks of a ``grpc.aio.ServicerContext``. ``remaining``: the seconds left
    before the call's deadline, asked afresh at each call (None: no deadline)."""

    def __init__(self, remaining: Callable[[], float | None] = lambda: None) -> None:
        self._remaining = remaining
        self.code: grpc.StatusCode | None = None  # set by a call that ends with an error without aborting
        self.details = ""
        self.trailing_metadata: Any = ()

    def time_remaining(self) -> float | None:
        return self._remaining()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def auth_context(self) -> dict:
        return {}

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing_metadata = metadata

    async def abort_with_status(self, status: grpc.Status) -> None:
        raise Aborted(status)


class HeldLog(DecisionLog):
    """A real decision log whose commits wait until :attr:`gate` is set."""

    def __init__(self, url: str) -> None:
        self.gate = threading.Event()
        super().__init__(url)

    def _commit(self, prepared: list) -> list:
        self.gate.wait(30)
        return super()._commit(prepared)


@pytest.fixture
def held_log(tmp_path: Path) -> Iterator[HeldLog]:
    url = f"sqlite:///{tmp_path / 'decisions.sqlite3'}"
    migrate(url)
    decision_log = HeldLog(url)
    yield decision_log
    decision_log.gate.set()
    decision_log.close()


def committed(decision_log: DecisionLog) -> list[str]:
    """The correlation ids of the committed decisions, in commit order."""
    with decision_log.engine.connect() as connection:
        ids = schema.decisions.c.id
        return [r[0] for r in connection.execute(select(schema.decisions.c.correlation_id).order_by(ids))]


_BUNDLES = random_bundles(8)


def request(index: int, pad: int = 0) -> decision_service_pb2.EvaluateRequest:
    """An order bundle, correlation id ``item-<index>``; ``pad`` bytes of narrative make it larger."""
    bundle = copy.deepcopy(_BUNDLES[index % len(_BUNDLES)])
    if pad:
        patient = bundle["entry"][0]["resource"]
        assert patient["resourceType"] == "Patient"
        patient["text"] = {"status": "generated", "div": "<div>" + "x" * pad + "</div>"}
    proto = decision_service_pb2.EvaluateRequest(fhir_bundle=orjson.dumps(bundle), correlation_id=f"item-{index}")
    proto.as_of.FromDatetime(AS_OF)
    return proto


class Requests:
    """The stream's requests, counting how many the servicer has read; ``pause(k)`` is awaited
    before the k'th is handed over, when given."""

    def __init__(self, requests: list, pause: Callable[[int], Any] | None = None) -> None:
        self.requests = requests
        self.read = 0
        self._pause = pause

    async def __aiter__(self) -> AsyncIterator:
        for k, item in enumerate(self.requests):
            if self._pause is not None:
                await self._pause(k)
            self.read += 1
            yield item


async def settle(requests: Requests) -> None:
    """Wait until the servicer stops reading requests (none read for half a second)."""
    until = time.monotonic() + 20
    while time.monotonic() < until:
        before = requests.read
        await asyncio.sleep(0.5)
        if requests.read == before:
            return


def read_ahead(engine: Engine, decision_log: HeldLog, requests: list) -> tuple[int, list[str]]:
    """How many of ``requests`` the servicer reads while the first answer waits for its commit;
    then, once commits go on, the correlation ids answered."""
    servicer = DecisionServicer(engine, decision_log)
    source = Requests(requests)

    async def run() -> tuple[int, list[str]]:
        answers = servicer.EvaluateStream(source.__aiter__(), Context())
        first = asyncio.ensure_future(anext(answers))
        await settle(source)
        assert not first.done()  # its decision is not committed yet
        held = source.read
        decision_log.gate.set()
        answered = [(await first).correlation_id] + [a.correlation_id async for a in answers]
        return held, answered

    return asyncio.run(run())


def test_the_window_bounds_the_items_read_ahead(engine: Engine, held_log: HeldLog) -> None:
    requests = [request(k) for k in range(STREAM_WINDOW + 20)]
    assert sum(r.ByteSize() for r in requests[:STREAM_WINDOW]) < STREAM_WINDOW_BYTES  # the count binds first
    held, answered = read_ahead(engine, held_log, requests)
    assert held == STREAM_WINDOW
    assert answered == [f"item-{k}" for k in range(len(requests))]


def test_the_window_bounds_the_bytes_read_ahead(engine: Engine, held_log: HeldLog) -> None:
    requests = [request(k, pad=100 * 1024) for k in range(20)]
    size = len(requests[0].fhir_bundle)
    assert size < LARGE_REQUEST_BYTES
    # another is read while those unanswered add up to less than the window's bytes
    expected = -(-STREAM_WINDOW_BYTES // size)
    assert expected < STREAM_WINDOW
    held, answered = read_ahead(engine, held_log, requests)
    assert held == expected
    assert answered == [f"item-{k}" for k in range(len(requests))]


def test_nothing_is_read_ahead_of_a_large_item_but_one_is_always_read(engine: Engine, held_log: HeldLog) -> None:
    requests = [request(0, pad=LARGE_REQUEST_BYTES), *(request(k) for k in range(1, 5))]
    held, answered = read_ahead(engine, held_log, requests)
    assert held == 1
    assert answered == [f"item-{k}" for k in range(5)]


def test_each_answer_follows_its_commit_in_request_order(engine: Engine, held_log: HeldLog) -> None:
    servicer = DecisionServicer(engine, held_log)
    requests = [request(k) for k in range(12)]

    async def run() -> list[str]:
        answered = []
        answers = servicer.EvaluateStream(Requests(requests).__aiter__(), Context())
        first = asyncio.ensure_future(anext(answers))
        await asyncio.sleep(0.5)
        assert not first.done() and committed(held_log) == []  # held: nothing committed, nothing answered
        held_log.gate.set()
        answer = await first
        while True:
            answered.append(answer.correlation_id)
            assert answer.correlation_id in committed(held_log)  # committed before it is answered
            try:
                answer = await anext(answers)
            except StopAsyncIteration:
                return answered

    answered = asyncio.run(run())
    assert answered == [f"item-{k}" for k in range(12)]
    assert committed(held_log) == answered


async def until_aborted(answers: AsyncIterator) -> tuple[list[str], Aborted]:
    """The correlation ids a stream answered before it was aborted, and the abort (it must be)."""
    answered = []
    try:
        async for answer in answers:
            answered.append(answer.correlation_id)
    except Aborted as exc:
        return answered, exc
    raise AssertionError("the stream did not end with the deadline")


def test_a_deadline_met_while_reading_ahead_ends_the_stream_after_every_committed_answer(
    engine: Engine, held_log: HeldLog
) -> None:
    """Items read before the deadline are committed and answered, in order; the first read after
    it is answered DEADLINE_EXCEEDED and none after it is evaluated or committed."""
    servicer = DecisionServicer(engine, held_log)
    deadline = time.monotonic() + 1.0
    requests = [request(k) for k in range(8)]

    async def pause(k: int) -> None:
        if k == 4:  # the first four are read (and wait for their commit) before the deadline
            await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 0.05)
            held_log.gate.set()

    source = Requests(requests, pause)
    answers = servicer.EvaluateStream(source.__aiter__(), Context(lambda: deadline - time.monotonic()))
    answered, aborted = asyncio.run(until_aborted(answers))
    assert aborted.status.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert answered == [f"item-{k}" for k in range(4)]
    held_log.flush()
    assert committed(held_log) == answered


def test_a_decision_reached_after_the_deadline_is_neither_committed_nor_answered(
    engine: Engine, held_log: HeldLog
) -> None:
    """The deadline passes during an evaluation, after its last checkpoint: the decision is not
    committed, since the stream ends with DEADLINE_EXCEEDED instead of its answer."""
    held_log.gate.set()
    servicer = DecisionServicer(engine, held_log)
    remaining = iter([None, None, 5.0, 0.0])  # item-0: no deadline; item-1: time runs out while it is evaluated

    source = Requests([request(0), request(1)])
    answers = servicer.EvaluateStream(source.__aiter__(), Context(lambda: next(remaining, 0.0)))
    answered, aborted = asyncio.run(until_aborted(answers))
    assert aborted.status.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert answered == ["item-0"]
    held_log.flush()
    assert committed(held_log) == ["item-0"]


# -- the level a refusal is logged at ------------------------------------------------------------


def refusal_level(
    engine: Engine, caplog: pytest.LogCaptureFixture, proto: decision_service_pb2.EvaluateRequest
) -> tuple[Context, int, str]:
    """How the servicer ended the call (the context it set the status on), and the level and text it logged."""
    servicer = DecisionServicer(engine)
    with caplog.at_level(logging.DEBUG, logger="needlepoint.server.servicer"):
        caplog.clear()
        context = Context()
        assert asyncio.run(servicer.Evaluate(proto, context)) is None  # no answer: the call ends with an error
    [record] = [r for r in caplog.records if r.name == "needlepoint.server.servicer"]
    return context, record.levelno, record.getMessage()


def test_an_order_not_for_us_is_logged_at_debug(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    proto = decision_service_pb2.EvaluateRequest(fhir_bundle=orjson.dumps(not_for_us_bundle(random.Random(3), 0)))
    proto.as_of.FromDatetime(AS_OF)
    proto.correlation_id = "order-42"
    ended, level, message = refusal_level(engine, caplog, proto)
    assert ended.code is grpc.StatusCode.INVALID_ARGUMENT and "order.target" in message
    assert level == logging.DEBUG
    # the call ends with the status abort would have sent: its message, the BadRequest detail, the trailer
    assert ended.details.startswith("order.target: ")
    trailer = dict(ended.trailing_metadata)
    assert trailer["correlation-id"] == "order-42"
    status = status_pb2.Status.FromString(trailer["grpc-status-details-bin"])
    assert [v.field for v in error_from_status(status).field_violations] == ["order.target"]


def test_an_invalid_order_target_is_logged_at_info(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    proto = request(0)
    proto.order.CopyFrom(patient_pb2.InjectionOrder(target="knee", side="right", intent="therapeutic"))
    ended, level, message = refusal_level(engine, caplog, proto)
    assert ended.code is grpc.StatusCode.INVALID_ARGUMENT and "fields=order.target" in message
    assert level == logging.INFO



def test_no_order_is_not_for_us_on_every_road(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    # a typed context without an order, and a bundle whose own order is not a hip injection with
    # only a side given beside it: refused by the full mapping, not the early scan, and alike
    context = decision_service_pb2.EvaluateRequest(context=patient_pb2.PatientContext(sex="female"))
    partial = decision_service_pb2.EvaluateRequest(fhir_bundle=orjson.dumps(not_for_us_bundle(random.Random(3), 0)))
    partial.order.CopyFrom(patient_pb2.InjectionOrder(side="right"))
    for proto, field in ((context, "order"), (partial, "order.target")):
        proto.as_of.FromDatetime(AS_OF)
        ended, level, message = refusal_level(engine, caplog, proto)
        assert ended.code is grpc.StatusCode.INVALID_ARGUMENT and f"fields={field} " in message + " "
        assert level == logging.DEBUG
