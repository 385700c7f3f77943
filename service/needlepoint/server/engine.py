"""The evaluation engine behind the gRPC servicer and the CLI's in-process path.

Rule sets are loaded once into ``{id: Evaluator}``; :meth:`Engine.evaluate` takes an
``EvaluateRequest`` and returns a ``Decision`` or raises :class:`ServiceError`. Because the CLI
goes through the same request, in-process and remote evaluations give the same decision and the
same error text. Evaluation is pure CPU and synchronous; callers run it inline.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from needlepoint.core.evaluator import Evaluator
from needlepoint.core.record import PatientRecord, RecordError
from needlepoint.core.ruleset import RuleSet
from needlepoint.fhir.mapper import record_from_bundle, record_from_bundle_with_hip_order
from needlepoint.rulesets import DEFAULT_RULESET, bundled_rulesets_dir, discover, load_ruleset
from needlepoint.server import convert
from needlepoint.server.errors import ServiceError
from needlepoint.server.reload import Registry, UnknownVersion
from needlepoint.v1 import decision_pb2, decision_service_pb2, ruleset_pb2

log = logging.getLogger(__name__)

# The largest FHIR bundle accepted (INVALID_ARGUMENT beyond it).
MAX_BUNDLE_BYTES = 8 * 1024 * 1024
# The limit on one request message (RESOURCE_EXHAUSTED beyond it, naming the message type): a
# bundle at the limit plus room for the rest of the request. Checked by the server's request
# deserializer (needlepoint.server.wire), so that one oversized EvaluateStream item gets its own
# error and the stream goes on.
MAX_MESSAGE_BYTES = MAX_BUNDLE_BYTES + 1024 * 1024
# The transport's own limit, above which gRPC refuses a message before any of our code sees it
# (RESOURCE_EXHAUSTED for the whole call, a stream included). Set well above MAX_MESSAGE_BYTES so
# that the check above decides for every message of a plausible size.
MAX_TRANSPORT_BYTES = 4 * MAX_MESSAGE_BYTES


class EvaluatorLike(Protocol):
    """What the engine needs of :class:`needlepoint.core.evaluator.Evaluator`."""

    @property
    def ruleset(self) -> RuleSet: ...

    def evaluate(self, record: PatientRecord, as_of: dt.datetime, checkpoint: Callable[[], None] | None = None) -> dict[str, Any]: ...


def load_evaluators(rulesets_dir: Path | None = None) -> dict[str, EvaluatorLike]:
    """One Evaluator per subdirectory of ``rulesets_dir`` (default: the bundled rule sets) that
    holds a ``ruleset.yaml``, by rule-set id."""
    directory = Path(rulesets_dir) if rulesets_dir is not None else bundled_rulesets_dir()
    evaluators: dict[str, EvaluatorLike] = {}
    for sub in discover(directory):
        ruleset = load_ruleset(sub)
        if ruleset.id in evaluators:
            raise ValueError(f"{sub}: rule set id {ruleset.id!r} is loaded twice")
        evaluators[ruleset.id] = Evaluator(ruleset)
        log.info("loaded rule set %s %s (%s) from %s", ruleset.id, ruleset.version, ruleset.digest, sub)
    if not evaluators:
        raise ValueError(f"{directory}: no rule set (a subdirectory with ruleset.yaml)")
    return evaluators


# A request larger than this is evaluated with the cyclic garbage collector paused. Reading a
# large record creates hundreds of thousands of dicts and lists that all survive until the
# decision is made, and each survivor brings the next full collection closer: on an 8 MiB bundle
# the collector took about half the time (1.3 s with it, 0.7 s without). Nothing a request builds
# is cyclic, so reference counting frees it all the same; the collector resumes afterwards.
LARGE_REQUEST_BYTES = 256 * 1024
_paused = 0  # requests being evaluated with the collector paused (threads: the heavy lane and the loop)
_paused_lock = threading.Lock()


@contextlib.contextmanager
def collector_paused(pause: bool) -> Iterator[None]:
    """Pause the cyclic garbage collector for a large request (see ``LARGE_REQUEST_BYTES``)."""
    global _paused
    if not pause:
        yield
        return
    with _paused_lock:
        _paused += 1
        if _paused == 1:
            gc.disable()
    try:
        yield
    finally:
        with _paused_lock:
            _paused -= 1
            if _paused == 0:
                gc.enable()
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the memory a large request freed back to the system (glibc keeps freed heap pages
    otherwise, so a worker's resident size would stay at its largest request's). A few
    milliseconds, after large requests only; nothing where there is no glibc."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def request_size(request: decision_service_pb2.EvaluateRequest) -> int:
    """How large a request is, cheaply: the bundle's bytes, or the typed context's encoded size."""
    if request.WhichOneof("patient") == "fhir_bundle":
        return len(request.fhir_bundle)
    return request.ByteSize()


def _deadline_check(deadline: float | None) -> Callable[[], None] | None:
    """A checkpoint that raises DEADLINE_EXCEEDED once ``deadline`` (monotonic seconds) has passed."""
    if deadline is None:
        return None

    def check() -> None:
        if time.monotonic() >= deadline:
            raise ServiceError.deadline_exceeded("during")

    return check


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Engine:
    """Loaded rule sets (several versions side by side), and the evaluation of one request."""

    def __init__(self, evaluators: Mapping[str, EvaluatorLike] | Registry, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        if isinstance(evaluators, Registry):
            self.registry = evaluators
        else:
            self.registry = Registry()
            for evaluator in evaluators.values():
                self.registry.add(evaluator)  # type: ignore[arg-type]
        self._clock = clock

    @classmethod
    def load(cls, rulesets_dir: Path | None = None) -> Engine:
        return cls(load_evaluators(rulesets_dir))

    @property
    def ruleset_ids(self) -> list[str]:
        return self.registry.ids

    def evaluator(self, ruleset_id: str, path: str = "ruleset_id", version: str = "") -> EvaluatorLike:
        """The evaluator of a rule set (a pinned version, or the one serving); NOT_FOUND if not loaded."""
        try:
            return self.registry.get(ruleset_id, version)
        except UnknownVersion as exc:
            raise ServiceError.not_found(path if not version else "ruleset_version", str(exc)) from None

    def evaluate(self, request: decision_service_pb2.EvaluateRequest, *, deadline: float | None = None) -> decision_pb2.Decision:
        """The decision for one request. Bad input raises ServiceError; any other exception is a
        fault of the service and propagates. ``deadline`` (``time.monotonic()`` seconds): past
        it, the evaluation stops at the next stage boundary with DEADLINE_EXCEEDED, so a caller
        who has given up stops costing CPU."""
        evaluator = self.evaluator(request.ruleset_id or DEFAULT_RULESET, version=request.ruleset_version)
        checkpoint = _deadline_check(deadline)
        with collector_paused(request_size(request) > LARGE_REQUEST_BYTES):
            try:
                record = self.record(request)
                if checkpoint is not None:
                    checkpoint()
                has_as_of = request.HasField("as_of")
                as_of = convert.as_of_to_datetime(request.as_of, "as_of") if has_as_of else self._clock()
                decision = evaluator.evaluate(record, as_of, checkpoint)
            except RecordError as exc:
                raise ServiceError.from_record_error(exc) from None
            return convert.decision_to_proto(decision)

    def record(self, request: decision_service_pb2.EvaluateRequest) -> PatientRecord:
        """The patient record of a request, with its order override applied. Raises RecordError."""
        road = request.WhichOneof("patient")
        if road == "context":
            record = convert.record_from_context(request.context)
        elif road == "fhir_bundle":
            record = _record_from_bundle_bytes(request.fhir_bundle, own_order=not request.HasField("order"))
        else:
            raise RecordError("patient", "one of context or fhir_bundle is required")
        if request.HasField("order"):
            record = convert.apply_order_override(record, request.order)
        return record

    def explain(self, request: decision_service_pb2.ExplainRequest) -> decision_service_pb2.ExplainResponse:
        """Why a rule did or did not fire, and verified counterfactuals, for one evaluation."""
        from google.protobuf import json_format

        from needlepoint.authoring.explain import counterfactuals, explain_rule

        inner = request.request
        evaluator = self.evaluator(inner.ruleset_id or DEFAULT_RULESET, version=inner.ruleset_version)
        try:
            record = self.record(inner)
            as_of = convert.as_of_to_datetime(inner.as_of, "request.as_of") if inner.HasField("as_of") else self._clock()
            report = {"counterfactuals": counterfactuals(evaluator, record, as_of)}
            if request.rule_id:
                report["rule"] = explain_rule(evaluator, record, as_of, request.rule_id)
        except RecordError as exc:
            raise ServiceError.from_record_error(exc) from None
        return json_format.ParseDict(report, decision_service_pb2.ExplainResponse())

    def _ruleset_proto(self, ruleset_id: str, version: str, *, full: bool) -> ruleset_pb2.Ruleset:
        msg = convert.ruleset_to_proto(self.registry.get(ruleset_id, version).ruleset, full=full)
        msg.serving = version == self.registry.serving(ruleset_id)
        outcome = self.registry.last_reload.get(ruleset_id)
        if outcome is not None:
            msg.last_reload.outcome, msg.last_reload.message = outcome.outcome, outcome.message
            msg.last_reload.version, msg.last_reload.digest = outcome.version, outcome.digest
            msg.last_reload.at.FromDatetime(outcome.at)
        return msg

    def list_rulesets(self) -> decision_service_pb2.ListRulesetsResponse:
        return decision_service_pb2.ListRulesetsResponse(
            rulesets=[self._ruleset_proto(i, v, full=False) for i in self.ruleset_ids for v in self.registry.versions(i)]
        )

    def get_ruleset(self, ruleset_id: str, version: str = "") -> ruleset_pb2.Ruleset:
        if not ruleset_id:
            raise ServiceError.bad_input("id", "a rule set id is required")
        evaluator = self.evaluator(ruleset_id, "id", version)
        return self._ruleset_proto(ruleset_id, evaluator.ruleset.version, full=True)


def _record_from_bundle_bytes(data: bytes, own_order: bool = False) -> PatientRecord:
    """A FHIR Bundle (JSON bytes) as a PatientRecord; the size is checked here, the rest by the
    mapper (malformed JSON is a RecordError at ``Bundle``). With ``own_order`` (no order beside
    the bundle), a bundle without a hip injection order is refused before it is mapped."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise RecordError("fhir_bundle", f"the bundle is {len(data)} bytes; the limit is {MAX_BUNDLE_BYTES} bytes")
    return record_from_bundle_with_hip_order(data) if own_order else record_from_bundle(data)
