"""The client library against an in-process server whose evaluator is a small fake, and the typed
road's conversions. The fake lets these tests produce what the real rules never should: faults,
slow evaluations, UNAVAILABLE."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import grpc
import pytest

from needlepoint import intake
from needlepoint.core import decision, record as rec
from needlepoint.server.errors import ServiceError
from needlepoint.server.service import Engine
from needlepoint.server.servicer import RunningServer, start_server
from needlepoint.v1 import patient_pb2
from needlepoint_client import (
    Coding,
    EvaluationError,
    InjectionOrder,
    NeedlepointClient,
    NeedlepointError,
    PatientContext,
    decision_to_dict,
    make_request,
)

UTC = dt.timezone.utc
ORDER = InjectionOrder(target="hip-intra-articular", side="left", intent="therapeutic")
LOINC = "http://loinc.org"
NP = "http://needlepoint.dev/fhir/CodeSystem"


class FakeRuleset:
    id = "fake"
    version = "0.0.1"
    digest = "sha256:fake"
    status = "draft"
    title = "A fake rule set"
    rules = ()
    params: ClassVar[dict[str, Any]] = {}


class FakeEvaluator:
    """Decides from the record's sex, so each test can ask for what it needs:
    ``other`` raises a bug, ``unknown`` is slow, anything else defers for missing data
    (after ``unavailable`` UNAVAILABLE answers)."""

    ruleset = FakeRuleset()
    observation_codes = None  # map every Observation

    def __init__(self) -> None:
        self.calls = 0
        self.unavailable = 0
        self.records: list[rec.PatientRecord] = []

    def decide(self, record: rec.PatientRecord, as_of: dt.datetime, checkpoint=None) -> decision.Decision:
        self.calls += 1
        self.records.append(record)
        if self.unavailable:
            self.unavailable -= 1
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "try again")
        if record.order is None:
            raise rec.RecordError("order", "no injection order")
        if record.sex == "other":
            raise KeyError("a bug")
        if record.sex == "unknown":
            import time

            time.sleep(0.5)
        return decision.Decision(
            decision_id=f"d{self.calls}",
            as_of=as_of.strftime("%Y-%m-%dT%H:%M:%SZ"),
            ruleset=decision.RulesetRef("fake", "0.0.1", "sha256:fake"),
            modality=None,
            injectates=(),
            deferrals=(decision.Deferral("PENDING_DATA", "HARD", "PROCEDURE", ("r",), "m"),),
            cautions=(),
            missing_data=(decision.MissingData("INR", "no INR", ("r",)),),
            explanations=(decision.Explanation(decision.RuleHead("r", "1", "t", "data", "o", "", (), ()), "o", ()),),
        )


class InProcessServer:
    """The real servicer on a loopback port, in a background event loop."""

    def __init__(self, engine: Engine) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self._run(start_server(engine, "127.0.0.1:0", reuse_port=False))
        self.target = f"127.0.0.1:{self.running.port}"

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def stop(self) -> None:
        self._run(self.running.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def evaluator() -> FakeEvaluator:
    return FakeEvaluator()


@pytest.fixture(scope="module")
def server(evaluator: FakeEvaluator) -> Iterator[InProcessServer]:
    server = InProcessServer(Engine({"fake": evaluator}))
    yield server
    server.stop()


@pytest.fixture
def client(server: InProcessServer, evaluator: FakeEvaluator) -> Iterator[NeedlepointClient]:
    evaluator.unavailable = 0
    with NeedlepointClient(server.target, timeout=5, retries=3) as client:
        yield client


def test_evaluate_context_returns_the_decision(client: NeedlepointClient) -> None:
    as_of = dt.datetime(2025, 6, 2, 9, tzinfo=UTC)
    decision = client.evaluate_context(PatientContext(sex="female", order=ORDER), as_of=as_of, ruleset_id="fake")
    body = decision_to_dict(decision)
    assert body["asOf"] == "2025-06-02T09:00:00Z"
    assert body["deferrals"] == [
        {"reason": "PENDING_DATA", "severity": "HARD", "scope": "PROCEDURE", "ruleIds": ["r"], "message": "m"}
    ]
    assert body["missingData"] == [{"code": "INR", "message": "no INR", "ruleIds": ["r"]}]


def test_bad_context_raises_evaluation_error_with_the_field(client: NeedlepointClient) -> None:
    context = PatientContext(order=ORDER, observations=[patient_pb2.Observation(codes=[Coding(system=LOINC)])])
    with pytest.raises(EvaluationError) as caught:
        client.evaluate_context(context, ruleset_id="fake")
    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "context.observations[0].codes[0].code: a coding needs a code"
    assert [(v.field, v.description) for v in error.field_violations] == [
        ("context.observations[0].codes[0].code", "a coding needs a code")
    ]


def test_unknown_ruleset_is_not_found(client: NeedlepointClient) -> None:
    with pytest.raises(EvaluationError) as caught:
        client.evaluate_context(PatientContext(order=ORDER), ruleset_id="nope")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.message == "ruleset_id: unknown rule set 'nope' (loaded: fake)"
    with pytest.raises(EvaluationError) as caught:
        client.get_ruleset("nope")
    assert caught.value.message.startswith("id: unknown rule set 'nope'")


def test_a_fault_is_internal_with_a_generic_message_and_the_server_goes_on(
    client: NeedlepointClient, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(NeedlepointError) as caught:
        client.evaluate_context(PatientContext(sex="other", order=ORDER), ruleset_id="fake", correlation_id="c-9")
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert "a bug" not in caught.value.message
    assert not isinstance(caught.value, EvaluationError)
    from needlepoint.security.logsafe import correlation_ref  # logs carry the id's digest, never the id

    assert any(correlation_ref("c-9") in r.getMessage() and r.exc_info for r in caplog.records)
    assert client.evaluate_context(PatientContext(sex="female", order=ORDER), ruleset_id="fake").decision_id


def test_unavailable_is_retried_with_backoff(client: NeedlepointClient, evaluator: FakeEvaluator) -> None:
    evaluator.unavailable = 2
    before = evaluator.calls
    client.evaluate_context(PatientContext(sex="female", order=ORDER), ruleset_id="fake")
    assert evaluator.calls - before == 3


def test_unavailable_beyond_the_retries_fails(server: InProcessServer, evaluator: FakeEvaluator) -> None:
    evaluator.unavailable = 5
    before = evaluator.calls
    with NeedlepointClient(server.target, retries=1) as client, pytest.raises(NeedlepointError) as caught:
        client.evaluate_context(PatientContext(order=ORDER), ruleset_id="fake")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert evaluator.calls - before == 2
    evaluator.unavailable = 0


def test_bad_input_is_not_retried(client: NeedlepointClient, evaluator: FakeEvaluator) -> None:
    before = evaluator.calls
    with pytest.raises(EvaluationError):
        client.evaluate_context(PatientContext(), ruleset_id="fake")
    assert evaluator.calls - before == 1


def test_the_deadline_holds(client: NeedlepointClient) -> None:
    with pytest.raises(NeedlepointError) as caught:
        client.evaluate_context(PatientContext(sex="unknown", order=ORDER), ruleset_id="fake", timeout=0.1)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_stream_keeps_order_and_isolates_errors(client: NeedlepointClient) -> None:
    contexts = {
        "a": PatientContext(sex="female", order=ORDER),
        "b": PatientContext(sex="female"),  # no order
        "c": PatientContext(sex="other", order=ORDER),  # a fault of the service
        "d": PatientContext(sex="male", order=ORDER),
    }
    requests = (make_request(context=c, ruleset_id="fake", correlation_id=k) for k, c in contexts.items())
    results = list(client.evaluate_stream(requests))
    assert [r.correlation_id for r in results] == ["a", "b", "c", "d"]
    assert [r.ok for r in results] == [True, False, False, True]
    assert isinstance(results[1].error, EvaluationError)
    assert results[1].error.field_violations[0].field == "order"
    assert results[2].error is not None and results[2].error.code is grpc.StatusCode.INTERNAL
    assert results[3].decision is not None and results[3].decision.deferrals


def test_health_and_rulesets(client: NeedlepointClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("needlepoint.v1.DecisionService") == "SERVING"
    assert [(r.id, r.version, r.status, r.title) for r in client.list_rulesets()] == [
        ("fake", "0.0.1", "draft", "A fake rule set")
    ]


def test_make_request_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        make_request()
    with pytest.raises(ValueError):
        make_request(fhir_bundle=b"{}", context=PatientContext())
    with pytest.raises(ValueError, match="time zone"):
        make_request(fhir_bundle=b"{}", as_of=dt.datetime(2025, 1, 1))
    request = make_request(fhir_bundle={"resourceType": "Bundle"}, order=ORDER)
    assert request.fhir_bundle == b'{"resourceType":"Bundle"}'
    assert request.order == ORDER and not request.HasField("as_of")


# -- the typed road ------------------------------------------------------------------------------


def full_context() -> PatientContext:
    ts = intake.datetime_to_timestamp
    return PatientContext(
        birth_date="1950-03-04",
        sex="female",
        conditions=[patient_pb2.Condition(codes=[Coding(system="http://hl7.org/fhir/sid/icd-10-cm", code="M16.11")])],
        medications=[
            patient_pb2.Medication(codes=[Coding(system="http://www.nlm.nih.gov/research/umls/rxnorm", code="11289")])
        ],
        observations=[
            patient_pb2.Observation(
                codes=[Coding(system=LOINC, code="6301-6", display="INR")],
                effective=ts(dt.datetime(2025, 5, 30, 8, tzinfo=UTC)),
                value=0.0,
                unit="{INR}",
            ),
            patient_pb2.Observation(
                codes=[Coding(system=LOINC, code="82810-3")],
                value_code=Coding(system="http://snomed.info/sct", code="60001007"),
            ),
            patient_pb2.Observation(
                codes=[Coding(system=LOINC, code="777-3")],
                effective=ts(dt.datetime(2025, 5, 30, 8, tzinfo=UTC)),
                value=25.0,
                unit_display="K/uL",
            ),
        ],
        allergies=[
            patient_pb2.Allergy(codes=[Coding(system="http://snomed.info/sct", code="294505008")], severity="severe")
        ],
        prior_injections=[
            patient_pb2.PriorInjection(
                codes=[Coding(system="http://www.ama-assn.org/go/cpt", code="20610")],
                performed=ts(dt.datetime(2025, 3, 1, tzinfo=UTC)),
                target="hip-intra-articular",
                side="left",
                agents=[Coding(system="http://www.whocc.no/atc", code="H02AB08")],
            )
        ],
        planned_surgeries=[
            patient_pb2.PlannedSurgery(codes=[Coding(system="http://www.ama-assn.org/go/cpt", code="27130")])
        ],
        order=ORDER,
        planned_injectates=[
            patient_pb2.PlannedInjectate(
                codes=[Coding(system=f"{NP}/injectate-category", code="corticosteroid")]
            )
        ],
        flags=["hot-painful-joint"],
    )


def test_record_from_context_maps_every_field() -> None:
    record = intake.record_from_context(full_context())
    assert record.birth_date == dt.date(1950, 3, 4) and record.sex == "female"
    assert record.conditions[0].codes == [rec.Code("icd10cm", "M16.11")]
    assert record.conditions[0].source == "context.conditions[0]"
    inr, pregnancy, platelets = record.observations
    assert (inr.value, inr.unit, inr.effective) == (0.0, "{INR}", dt.datetime(2025, 5, 30, 8, tzinfo=UTC))
    assert (platelets.value, platelets.unit, platelets.unit_display) == (25.0, None, "K/uL")
    assert inr.codes == [rec.Code("loinc", "6301-6", "INR")]
    assert (pregnancy.value, pregnancy.unit, pregnancy.effective) == (None, None, None)
    assert pregnancy.value_code == rec.Code("snomed", "60001007")
    assert (record.allergies[0].severity, record.allergies[0].criticality) == ("severe", None)
    assert record.prior_injections[0].agents == [rec.Code("atc", "H02AB08")]
    assert record.planned_surgeries[0].date is None
    assert record.order == rec.InjectionOrder("hip-intra-articular", "left", "therapeutic", source="context.order")
    assert record.planned_injectates[0].codes == [rec.Code("np-injectate", "corticosteroid")]
    assert record.flags == ["hot-painful-joint"]


def test_context_round_trips_through_the_record() -> None:
    context = full_context()
    assert intake.context_from_record(intake.record_from_context(context)) == context


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda c: setattr(c, "birth_date", "1950-3-4"), "context.birth_date"),
        (lambda c: setattr(c, "sex", "f"), "context.sex"),
        (lambda c: setattr(c.order, "intent", "curative"), "context.order.intent"),
        (lambda c: setattr(c.allergies[0], "criticality", "very"), "context.allergies[0].criticality"),
        (lambda c: setattr(c.observations[0].codes[0], "system", ""), "context.observations[0].codes[0].system"),
        (
            lambda c: setattr(c.planned_injectates[0].codes[0], "code", "steroid"),
            "context.planned_injectates[0].codes[0].code",
        ),
        (lambda c: c.conditions.add(), "context.conditions[1].codes"),
        (lambda c: c.flags.append("feels-unwell"), "context.flags[1]"),
        (lambda c: setattr(c.observations[0].effective, "seconds", 10**12), "context.observations[0].effective"),
    ],
)
def test_bad_context_names_the_field(change: Any, path: str) -> None:
    context = full_context()
    change(context)
    with pytest.raises(rec.RecordError) as caught:
        intake.record_from_context(context)
    assert caught.value.path == path


def test_order_override_merges_field_by_field() -> None:
    record = intake.record_from_context(full_context())
    merged = intake.apply_order(record, intake.order_from_proto(InjectionOrder(side="right"), "order"))
    assert merged.order == rec.InjectionOrder("hip-intra-articular", "right", "therapeutic", source="context.order")
    bare = intake.apply_order(rec.PatientRecord(), intake.order_from_proto(InjectionOrder(target="iliopsoas-bursa"), "order"))
    assert bare.order == rec.InjectionOrder("iliopsoas-bursa", None, None, source="order")
    with pytest.raises(rec.RecordError, match=r"^order\.side: "):
        intake.order_from_proto(InjectionOrder(side="middle"), "order")
