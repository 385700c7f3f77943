"""Hostile input, property-based and bounded to seconds: every road answers a decision or a clean
rejection, never INTERNAL, UNKNOWN, a traceback or a crash (issue 8, items 3 and 9).

The inputs come from the long fuzzer's generators (``bench/fuzz.py``: structure-aware FHIR
mutations, damaged bytes, mutated contexts, odd correlation ids, deep and oversized input),
driven by hypothesis, and from hypothesis' own strategies (any bytes, any text, any JSON value,
any Timestamp). Runs are derandomized, so CI sees the same inputs every time; ``scripts/fuzz``
runs the same generators for minutes.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import orjson
import pytest
from click.testing import CliRunner
from google.protobuf import timestamp_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings, strategies as st

from needlepoint.cli import main as cli_main
from needlepoint.core.record import RecordError
from needlepoint.fhir import mapper
from needlepoint.fhir.mapper import record_from_bundle
from needlepoint.security.logsafe import correlation_ref
from needlepoint.server import wire
from needlepoint.server.errors import MAX_MESSAGE_CHARS, correlation_id_problem
from needlepoint.v1 import decision_service_pb2

if TYPE_CHECKING:
    from conftest import ServerProcess

REPO = Path(__file__).resolve().parents[1]


def _load_fuzz_module() -> Any:
    """bench/fuzz.py, imported under a name of its own (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("needlepoint_bench_fuzz", REPO / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz_module()
CHEAP_KINDS = sorted(k for k in fuzz.GENERATORS if k != "oversized")
ORDER_BUNDLE = orjson.loads(fuzz.ORDER_BUNDLE.read_bytes())
AS_OF = "2025-06-02T09:00:00Z"

BOUNDED = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
}

# Any JSON value, hostile dates and strings among the leaves.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(fuzz.HOSTILE_DATES) | st.text(max_size=30) | st.sampled_from(fuzz.HOSTILE_STRINGS),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
TIMESTAMPS = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.sampled_from(fuzz.HOSTILE_SECONDS) | st.integers(-(2**63), 2**63 - 1),
    nanos=st.sampled_from(fuzz.HOSTILE_NANOS) | st.integers(-(2**31), 2**31 - 1),
)


@pytest.fixture(scope="module")
def road() -> Any:
    """The servicer's code path in this process: lenient deserializer, correlation-id check,
    engine, guard."""
    return fuzz.InProcessRunner()


@pytest.fixture(scope="module")
def corpus() -> Any:
    return fuzz.Corpus.load(synthea=False)


def assert_clean(outcome: Any) -> None:
    assert outcome.problem is None, outcome.problem


# -- the mapper and the engine, in process -------------------------------------------------------


@settings(max_examples=250, **BOUNDED)
@given(kind=st.sampled_from(CHEAP_KINDS), seed=st.integers(0, 2**32 - 1))
def test_generated_inputs_get_a_decision_or_a_clean_rejection(road: Any, corpus: Any, kind: str, seed: int) -> None:
    assert_clean(road.evaluate(fuzz.GENERATORS[kind](corpus, random.Random(seed))))


@settings(max_examples=150, **BOUNDED)
@given(value=JSON_VALUES, pick=st.randoms(use_true_random=False))
def test_any_json_value_anywhere_in_a_bundle_is_mapped_or_a_record_error(road: Any, value: Any, pick: random.Random) -> None:
    bundle = orjson.loads(orjson.dumps(ORDER_BUNDLE))
    slots: list[tuple[Any, Any]] = []
    fuzz._nodes(bundle, slots)
    container, key = pick.choice(slots)
    container[key] = value
    data = orjson.dumps(bundle)
    try:
        record_from_bundle(data)
    except RecordError as error:
        assert error.path and len(error.message) < 2000
    assert_clean(road.evaluate(fuzz.request_bytes(bundle=data)))


@settings(max_examples=150, **BOUNDED)
@given(data=st.binary(max_size=400))
def test_any_bytes_are_a_request_or_invalid_argument_naming_the_type(road: Any, data: bytes) -> None:
    decoded = wire.lenient_deserializer(decision_service_pb2.EvaluateRequest)(data)
    if isinstance(decoded, wire.Rejected):
        assert decoded.error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in decoded.error.violations] == ["needlepoint.v1.EvaluateRequest"]
    assert_clean(road.evaluate(data))


@settings(max_examples=100, **BOUNDED)
@given(as_of=TIMESTAMPS, where=st.sampled_from(["as_of", "effective", "performed", "deceased_at"]))
def test_any_timestamp_is_evaluated_or_rejected_naming_the_field(road: Any, corpus: Any, as_of: Any, where: str) -> None:
    context = decision_service_pb2.EvaluateRequest().context
    context.CopyFrom(corpus.contexts[0])
    if where == "effective" and context.observations:
        context.observations[0].effective.CopyFrom(as_of)
    elif where == "performed" and context.prior_injections:
        context.prior_injections[0].performed.CopyFrom(as_of)
    elif where == "deceased_at":
        context.deceased_at.CopyFrom(as_of)
    stamp = as_of if where == "as_of" else fuzz.AS_OF
    assert_clean(road.evaluate(fuzz.request_bytes(context=context, order=True, as_of=stamp)))


@settings(max_examples=200, **BOUNDED)
@given(
    text=st.from_regex(
        r"-?[0-9]{1,5}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,12})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?",
        fullmatch=True,
    )
)
def test_a_parsed_date_time_can_always_be_compared_in_utc(text: str) -> None:
    try:
        value = mapper._parse_datetime(text)
    except mapper._DateProblem:
        return
    assert value.astimezone(dt.timezone.utc).tzinfo is dt.timezone.utc


@settings(max_examples=150, **BOUNDED)
@given(cid=st.text(max_size=200) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=120, max_size=140))
def test_a_correlation_id_is_accepted_or_rejected_by_name(road: Any, corpus: Any, cid: str) -> None:
    request = decision_service_pb2.EvaluateRequest.FromString(fuzz.request_bytes(context=corpus.contexts[0], order=True))
    outcome = road.servicer._checked_evaluate
    request.correlation_id = cid
    if correlation_id_problem(cid) is None:
        assert len(cid) <= 128 and cid.isascii() and cid.isprintable()
        outcome(request)
    else:
        error = road.guard("test", cid, lambda: outcome(request))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["correlation_id"]
        assert cid not in error.message or not cid


def test_the_findings_of_issue_8_are_bad_input(road: Any, corpus: Any) -> None:
    """The reported INTERNAL inputs, one by one: each is a decision (an unreadable date is a data
    issue) or INVALID_ARGUMENT naming its field, with a short message."""
    def bundle_with(**fields: Any) -> bytes:
        bundle = orjson.loads(orjson.dumps(ORDER_BUNDLE))
        patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        patient.update(fields)
        return orjson.dumps(bundle)

    for fields in ({"deceasedDateTime": "0001-01-01T00:00:00+01:00"}, {"deceasedDateTime": "9999-12-31T23:59:59-01:00"},
                   {"birthDate": "9999-12"}, {"birthDate": "x" * 100_000}):
        assert_clean(road.evaluate(fuzz.request_bytes(bundle=bundle_with(**fields))))
    for seconds in (-62135596800, -30610224001, 253402300799):
        outcome = road.evaluate(fuzz.request_bytes(bundle=bundle_with(), as_of=timestamp_pb2.Timestamp(seconds=seconds)))
        assert_clean(outcome)
    deep = bundle_with(resourceType="\x00DEEP\x00").replace(b'"\\u0000DEEP\\u0000"', b"[" * 1015 + b"]" * 1015)
    with pytest.raises(RecordError) as caught:
        record_from_bundle(deep)
    assert caught.value.path.startswith("Bundle") and len(caught.value.message) < 200


# -- the gRPC API, against a real server ---------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(server_process: type[ServerProcess]) -> Iterator[ServerProcess]:
    """One server (one worker) for this module; on teardown it must stop cleanly, and its log must
    hold no traceback, no worker death, no overlong line and no invalid correlation id."""
    server = server_process(1)
    try:
        server.wait_for(r"serving with 1 worker\(s\)", timeout=60)
        yield server
    finally:
        code = server.stop()
    log = "\n".join(server.lines)
    assert code == 0, log
    assert not any(fuzz.log_problems(log).values()), fuzz.log_problems(log)


@pytest.fixture(scope="module")
def runner(fuzz_server: ServerProcess) -> Iterator[Any]:
    runner = fuzz.GrpcRunner(fuzz_server.target, timeout=20)
    yield runner
    runner.close()


@pytest.mark.slow
@settings(max_examples=120, **BOUNDED)
@given(kind=st.sampled_from(CHEAP_KINDS), seed=st.integers(0, 2**32 - 1))
def test_the_api_answers_generated_inputs_cleanly(runner: Any, corpus: Any, kind: str, seed: int) -> None:
    assert_clean(runner.evaluate(fuzz.GENERATORS[kind](corpus, random.Random(seed))))


@pytest.mark.slow
@settings(max_examples=40, **BOUNDED)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_stream_answers_every_generated_item(runner: Any, corpus: Any, seed: int) -> None:
    items = fuzz.stream_items(corpus, random.Random(seed))
    call, answers = runner.evaluate_stream([data for _, data in items])
    assert_clean(call)
    for answer in answers:
        assert_clean(answer)


@pytest.mark.slow
def test_an_oversized_stream_item_gets_its_own_error_and_the_stream_goes_on(runner: Any, corpus: Any) -> None:
    small = fuzz.request_bytes(context=corpus.contexts[0], order=True, correlation_id="small")
    huge = fuzz.request_bytes(bundle=b" " * (9 * fuzz.MIB + 10), order=True, correlation_id="huge")
    call, answers = runner.evaluate_stream([small, huge, small, b"\xff\xff", small])
    assert_clean(call)
    assert [a.code for a in answers] == ["OK", "RESOURCE_EXHAUSTED", "OK", "INVALID_ARGUMENT", "OK"]


@pytest.mark.slow
def test_correlation_ids_in_trailers_and_logs(fuzz_server: ServerProcess, corpus: Any) -> None:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        evaluate = channel.unary_unary(f"{fuzz.SERVICE}/Evaluate")
        _, call = evaluate.with_call(
            fuzz.request_bytes(context=corpus.contexts[0], order=True, correlation_id="ok-1"), timeout=20
        )
        assert ("correlation-id", "ok-1") in tuple(call.trailing_metadata())
        mark = len(fuzz_server.lines)
        for cid in ("CANARY é", "CANARY\n", "CANARY" * 20_000):
            with pytest.raises(grpc.RpcError) as caught:
                evaluate(fuzz.request_bytes(context=corpus.contexts[0], order=True, correlation_id=cid), timeout=20)
            error = caught.value
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            violations = fuzz.violations_of(rpc_status.from_call(error))
            assert [f for f, _ in violations] == ["correlation_id"]
            assert "correlation-id" not in dict(error.trailing_metadata())
        # the log names each refused id by its digest only, never the id itself
        fuzz_server.wait_for(re.escape(f"correlation={correlation_ref('CANARY' * 20_000)}"), start=mark, timeout=10)
        assert not any("CANARY" in line for line in fuzz_server.lines[mark:])


@pytest.mark.slow
def test_long_values_make_short_errors_a_python_client_can_read(fuzz_server: ServerProcess) -> None:
    """A 1 MB code in an own vocabulary is echoed as a short prefix at most: the status stays
    under the default metadata limit and the field violation reaches the client."""
    bundle = orjson.loads(orjson.dumps(ORDER_BUNDLE))
    request = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest")
    request["orderDetail"] = [
        {"coding": [{"system": "http://needlepoint.dev/fhir/CodeSystem/injection-intent", "code": "x" * 1_000_000}]}
    ]
    with grpc.insecure_channel(fuzz_server.target) as channel:
        evaluate = channel.unary_unary(f"{fuzz.SERVICE}/Evaluate")
        with pytest.raises(grpc.RpcError) as caught:
            evaluate(fuzz.request_bytes(bundle=orjson.dumps(bundle)), timeout=20)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) <= MAX_MESSAGE_CHARS
    [(path, description)] = fuzz.violations_of(rpc_status.from_call(error))
    assert path.endswith("orderDetail[0].coding[0].code") and len(description) <= MAX_MESSAGE_CHARS


# -- the CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "stdin", "path"),
    [
        pytest.param(["--as-of", "0001-01-01T00:00:00+01:00"], None, "as_of", id="as-of-year-1-with-offset"),
        pytest.param(["--as-of", "0999-01-01"], None, "as_of", id="as-of-before-year-1000"),
        pytest.param([], b"[" * 1015 + b"]" * 1015, "Bundle", id="deep-json"),
        pytest.param([], b'{"resourceType": ' + b"[" * 1010 + b"]" * 1010 + b"}", "Bundle.resourceType", id="deep-value"),
        pytest.param([], b"\xff\xfe not json", "Bundle", id="not-utf8"),
    ],
)
def test_the_cli_exits_2_with_the_path_and_no_traceback(args: list[str], stdin: bytes | None, path: str) -> None:
    data = stdin if stdin is not None else fuzz.ORDER_BUNDLE.read_bytes()
    result = CliRunner().invoke(cli_main, ["evaluate", "-", "--json", *args], input=data)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.output.startswith(f"error: {path}: ") and len(result.output) < 400, result.output


def test_the_cli_reads_a_bundle_with_hostile_dates(tmp_path: Path) -> None:
    bundle = orjson.loads(orjson.dumps(ORDER_BUNDLE))
    for entry in bundle["entry"]:
        entry["resource"]["effectiveDateTime"] = "9999-12-31T23:59:59-01:00"
        entry["resource"]["birthDate"] = "9999-12"
    result = CliRunner().invoke(cli_main, ["evaluate", "-", "--json", "--as-of", AS_OF], input=orjson.dumps(bundle))
    assert result.exit_code == 0, result.output
