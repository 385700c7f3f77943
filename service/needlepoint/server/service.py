"""The service behind every road (gRPC, CDS Hooks, the CLI in-process): requests in, Decision messages out.

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

from needlepoint.core.decision import Decision
from needlepoint.core.evaluator import Evaluator
from needlepoint.core.explain import counterfactuals, explain_rule
from needlepoint.core.record import ObservationCodes, PatientRecord, RecordError
from needlepoint.core.ruleset import RuleSet
from needlepoint.intake import as_of_to_datetime, record_from_request
from needlepoint.limits import LARGE_REQUEST_BYTES, RETURN_MEMORY_BYTES
from needlepoint.rulesets import DEFAULT_RULESET, bundled_rulesets_dir, discover, load_ruleset
from needlepoint.server import convert
from needlepoint.server.errors import ServiceError
from needlepoint.server.reload import Registry, UnknownVersion
from needlepoint.v1 import decision_pb2, decision_service_pb2, ruleset_pb2

log = logging.getLogger(__name__)


class EvaluatorLike(Protocol):
    """What the engine needs of :class:`needlepoint.core.evaluator.Evaluator`."""

    @property
    def ruleset(self) -> RuleSet: ...

    def evaluate(
        self, record: PatientRecord, as_of: dt.datetime, checkpoint: Callable[[], None] | None = None
    ) -> dict[str, Any]: ...

    def decide(self, record: PatientRecord, as_of: dt.datetime, checkpoint: Callable[[], None] | None = None) -> Decision: ...

    @property
    def observation_codes(self) -> ObservationCodes | None: ...


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


# A request larger than needlepoint.limits.LARGE_REQUEST_BYTES is evaluated with the cyclic
# garbage collector paused. Reading a large record creates hundreds of thousands of dicts and
# lists that all survive until the decision is made, and each survivor brings the next full
# collection closer: on an 8 MiB bundle the collector took about half the time (1.3 s with it,
# 0.7 s without). Nothing a request builds is cyclic, so reference counting frees it all the
# same; the collector resumes afterwards.
_paused = 0  # requests being evaluated with the collector paused (threads: the heavy lane and the loop)
_paused_lock = threading.Lock()
_unreturned = 0  # bytes of the large requests evaluated since freed memory was last given back


@contextlib.contextmanager
def collector_paused(pause: bool, size: int | None = None) -> Iterator[None]:
    """Pause the cyclic garbage collector for a large request (see ``LARGE_REQUEST_BYTES``), and
    afterwards give the memory large requests freed back to the system once they add up to
    ``RETURN_MEMORY_BYTES`` (``size``: this request's bytes; None counts as that much, so a caller
    that cannot say gives memory back after every large request)."""
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
        _freed(RETURN_MEMORY_BYTES if size is None else size)


def _freed(size: int) -> None:
    """Count a large request of ``size`` bytes as done, and return freed memory once the large
    requests since the last return add up to RETURN_MEMORY_BYTES (a single request that large
    returns it at once).

    Returning costs more than its own call: the malloc_trim, then the page faults of the next
    requests taking the pages back. After every request over 256 KiB, as once, that was 0.5 to
    1.2 ms of a Synthea-size bundle (0.1-3 MB), a fifth to a quarter of its cost (measured with
    bench/inprocess.py); see RETURN_MEMORY_BYTES for how often it is now. In between, the heap
    keeps what the last large requests freed and the next ones reuse it, so a worker's resident
    size is bounded by what those few requests need at once, and does not grow (bench/memory.py
    --synthea-every 10)."""
    global _unreturned
    with _paused_lock:
        _unreturned += size
        if _unreturned < RETURN_MEMORY_BYTES:
            return
        _unreturned = 0
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the memory a large request freed back to the system (glibc keeps freed heap pages
    otherwise, so a worker's resident size would stay at its largest request's). A few
    milliseconds; nothing where there is no glibc."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def bundle_and_size(request: decision_service_pb2.EvaluateRequest) -> tuple[bytes | None, int]:
    """The request's FHIR bundle (None for a typed context) and how large the request is, cheaply
    (the bundle's bytes, or the typed context's encoded size). Each read of ``request.fhir_bundle`` copies the bundle out of the
    message: a caller that needs the bytes as well as the size reads them here, once."""
    if request.WhichOneof("patient") == "fhir_bundle":
        bundle = request.fhir_bundle
        return bundle, len(bundle)
    return None, request.ByteSize()


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

    def evaluator(self, ruleset_id: str, path: str = "ruleset_id", version: str = "") -> Evaluator:
        """The evaluator of a rule set (a pinned version, or the one serving); NOT_FOUND if not loaded."""
        try:
            return self.registry.get(ruleset_id, version)
        except UnknownVersion as exc:
            raise ServiceError.not_found(path if not version else "ruleset_version", str(exc)) from None

    def evaluate(
        self,
        request: decision_service_pb2.EvaluateRequest,
        *,
        deadline: float | None = None,
        read: tuple[bytes | None, int] | None = None,
    ) -> decision_pb2.Decision:
        """The decision for one request. Bad input raises ServiceError; any other exception is a
        fault of the service and propagates. ``deadline`` (``time.monotonic()`` seconds): past
        it, the evaluation stops at the next stage boundary with DEADLINE_EXCEEDED, so a caller
        who has given up stops costing CPU. ``read``: the request's bundle and size when the caller
        has already read them (:func:`bundle_and_size`), so that the bundle is not copied again."""
        evaluator = self.evaluator(request.ruleset_id or DEFAULT_RULESET, version=request.ruleset_version)
        checkpoint = _deadline_check(deadline)
        bundle, size = read if read is not None else bundle_and_size(request)  # (each read copies the bundle)
        with collector_paused(size > LARGE_REQUEST_BYTES, size):
            try:
                record = self.record(request, bundle, evaluator.observation_codes)
                if checkpoint is not None:
                    checkpoint()
                has_as_of = request.HasField("as_of")
                as_of = as_of_to_datetime(request.as_of, "as_of") if has_as_of else self._clock()
                decision = evaluator.decide(record, as_of, checkpoint)
            except RecordError as exc:
                raise ServiceError.from_record_error(exc) from None
            return convert.encode_decision(decision)

    def record(
        self,
        request: decision_service_pb2.EvaluateRequest,
        bundle: bytes | None = None,
        observation_codes: ObservationCodes | None = None,
    ) -> PatientRecord:
        """The patient record of a request, with its order applied (:mod:`needlepoint.intake`);
        ``bundle``: its ``fhir_bundle`` when the caller has already read it; ``observation_codes``:
        the only Observations to map (an evaluator's, for its decision and its explanation). A
        bundle sent without an order that orders no hip injection is refused before it is mapped
        (the cheap answer for orders not for us: :func:`~needlepoint.intake.record_from_request`).
        Raises RecordError."""
        return record_from_request(request, bundle, refuse_early=True, observation_codes=observation_codes)

    def explain(self, request: decision_service_pb2.ExplainRequest) -> decision_service_pb2.ExplainResponse:
        """Why a rule did or did not fire, and verified counterfactuals, for one evaluation."""
        from google.protobuf import json_format

        inner = request.request
        evaluator = self.evaluator(inner.ruleset_id or DEFAULT_RULESET, version=inner.ruleset_version)
        try:
            record = self.record(inner, observation_codes=evaluator.observation_codes)  # what Evaluate read
            as_of = as_of_to_datetime(inner.as_of, "request.as_of") if inner.HasField("as_of") else self._clock()
            report: dict[str, Any] = {"counterfactuals": counterfactuals(evaluator, record, as_of)}
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
