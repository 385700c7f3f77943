"""Needlepoint fuzzer: hostile requests against a real server, counted by input kind and status.

    scripts/fuzz                          100,000 inputs against a fresh one-worker server
    scripts/fuzz --inputs 5000 --seed 3   a shorter run, another seed
    scripts/fuzz --minutes 10             stop after ten minutes, whatever the count
    scripts/fuzz --target host:port       against a running server (no log checks then)
    scripts/fuzz --in-process             the same unary inputs through the servicer's code
                                          path, without gRPC (faster; mapper and engine only)

Every input is the bytes of one request message, made by one of the generators in ``KINDS``:

* ``fhir-mutation``: a valid bundle (the order-time test bundle, a Synthea patient) with one to
  four structure-aware mutations: a node replaced by a hostile value (dates at the edges of the
  calendar, long and odd strings, extreme numbers, wrong types), keys dropped or added, entries
  duplicated, resource types swapped, codings and references broken;
* ``fhir-bytes``: the bundle's JSON text damaged byte by byte (truncated, flipped, invalid UTF-8);
* ``context``: a valid typed PatientContext with fields set to hostile values by descriptor
  (Timestamps out of range or with bad nanos, NaN and infinite values, odd codes, many items);
* ``protobuf-bytes``: random bytes, and valid requests with bits flipped, truncated, invalid
  UTF-8 in string fields, wrong wire types, deep groups, lying length prefixes;
* ``correlation-id``: a valid request whose correlation id is odd (control characters,
  non-ASCII, 129 to 100,000 characters, patient-like text);
* ``as-of``: a valid request evaluated at the edges of time (Timestamp minimum and maximum,
  before year 1000, invalid nanos);
* ``request-fields``: a valid patient with a hostile rule set id or version, or order override;
* ``deep``: a JSON value nested 100 to 1,100 levels deep at a random place of the bundle;
* ``oversized``: a bundle just over 8 MiB, a message just over 9 MiB;
* ``stream``: an EvaluateStream batch of such items, an oversized one included now and then; the
  stream must answer every item, in order.

What counts as a failure (any of them makes the exit code 1): a status other than OK,
INVALID_ARGUMENT, RESOURCE_EXHAUSTED or NOT_FOUND (so INTERNAL and UNKNOWN); a rejection without
a ``google.rpc.BadRequest`` field violation naming a path, readable by the Python gRPC client at
its default metadata limit; a status message or description over 300 characters; a stream that
does not answer every item; and on the server's log, a traceback, a worker death, a line over
2,000 characters, or an invalid correlation id (they all carry the word CANARY) written out.
The first failures of each kind are saved under ``--save`` for replay.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the seeded patient generator lives with the tests

from google.protobuf import timestamp_pb2  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor  # noqa: E402
from google.protobuf.message import Message  # noqa: E402

from needlepoint.v1 import decision_service_pb2, patient_pb2  # noqa: E402

SERVICE = "/needlepoint.v1.DecisionService"
MIB = 1024 * 1024
MAX_TEXT = 300  # the server's cap on a status message or a description
AS_OF = timestamp_pb2.Timestamp(seconds=int(dt.datetime(2025, 6, 2, 9, tzinfo=dt.timezone.utc).timestamp()))
ORDER = patient_pb2.InjectionOrder(target="hip-intra-articular", side="right", intent="therapeutic")
ORDER_BUNDLE = ROOT / "tests" / "data" / "fhir" / "hip_injection_order.json"
SYNTHEA = ROOT.parent / "shared" / "fixtures" / "synthea"

# -- hostile values ------------------------------------------------------------------------------

HOSTILE_DATES = [
    "0001-01-01T00:00:00+01:00", "0001-01-01T00:30:00+14:00", "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:59:59.999999-14:00", "9999-12", "9999", "0001", "0001-01", "0000-01-01", "0999-12-31",
    "0001-01-01", "9999-12-31", "9999-12-31T23:59:59Z", "2025-02-30", "2025-13-01T00:00:00Z",
    "2025-06-02T24:00:00Z", "2025-06-02T23:59:60Z", "2025-06-02T10:00:00+24:00", "2025-06-02T10:00:00",
    "2025-06-02T10:00:00.1234567890123456789Z", "٢٠٢٥-٠٦-٠٢", "2025-06-02T10:00:00Z\n", " 2025-06-02",
    "-2025-01-01", "+2025-01-01", "20250602", "2025-W23", "", "2025", "2025-06", "1e9",
]
# A correlation id with the word CANARY is always invalid: it must never reach the server's log.
PHI_LIKE = "Jane Q Doe, born 1961-02-03, MRN 00123456"  # a valid id: logged, by design
HOSTILE_STRINGS = [
    "", " ", "\x00", "\x00CANARY\x01", "\n\r\t", "\u202eCANARY", "\ufeff", "\ud7ff\ue000", "💉🦴",
    "x" * 129, "x" * 5000, "CANARY" * 20000, PHI_LIKE, "%s%n%x", "{}", "[]", "null", "'\"\\",
    "http://loinc.org", "urn:uuid:", "#", "Patient/", "ServiceRequest/../../etc", "\u0085\u2028\u2029",
]
HOSTILE_NUMBERS = [0, -0.0, -1, 1e308, -1e308, 5e-324, 2**63 - 1, -(2**63), 0.1, 123456789.123456789]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, 0.0, 3.4, -3.4]
HOSTILE_SECONDS = [
    -62135596800, -62135596801, 253402300799, 253402300800, 0, -30610224001, -30610224000,
    -(2**63), 2**63 - 1, 1748854800,
]
HOSTILE_NANOS = [0, 999_999_999, -1, 1_000_000_000, 2**31 - 1, -(2**31)]
DATE_KEYS = [
    "birthDate", "deceasedDateTime", "effectiveDateTime", "issued", "authoredOn", "onsetDateTime",
    "recordedDate", "performedDateTime", "abatementDateTime", "dateAsserted", "occurrenceDateTime",
]
RESOURCE_TYPES = [
    "Patient", "Condition", "MedicationRequest", "MedicationStatement", "Observation", "AllergyIntolerance",
    "Procedure", "ServiceRequest", "OperationOutcome", "Bundle", "", "patient",
]


def hostile_string(rng: random.Random) -> str:
    """A string from the hostile list, or random code points (surrogates excluded: JSON and
    protobuf cannot carry them)."""
    if rng.random() < 0.8:
        return rng.choice(HOSTILE_STRINGS)
    points = [rng.choice((rng.randrange(0x20, 0x7F), rng.randrange(0, 0x20), rng.randrange(0xA0, 0xD800),
                          rng.randrange(0xE000, 0x110000))) for _ in range(rng.randrange(1, 40))]
    return "".join(map(chr, points))


def hostile_json(rng: random.Random) -> Any:
    """A JSON value to put where the mapper expects something else (or the right kind of thing,
    with a hostile content)."""
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(HOSTILE_DATES)
    if roll < 0.6:
        return hostile_string(rng)
    if roll < 0.75:
        return rng.choice(HOSTILE_NUMBERS + [True, False, None])
    if roll < 0.9:
        return rng.choice([[], {}, [[]], {"a": {}}, [None], [{"coding": None}], {"coding": [{}]}])
    return [hostile_string(rng) for _ in range(rng.randrange(1, 300))]


# -- FHIR bundles ----------------------------------------------------------------------------------


def _nodes(value: Any, out: list[tuple[Any, Any]]) -> None:
    """Every (container, key) slot under ``value``, iteratively (values are shallow here)."""
    stack = [value]
    while stack:
        node = stack.pop()
        items = node.items() if type(node) is dict else enumerate(node) if type(node) is list else ()
        for key, child in items:
            out.append((node, key))
            if type(child) in (dict, list):
                stack.append(child)


def _entries(bundle: dict) -> list[dict]:
    entries = bundle.get("entry")
    return [e for e in entries if type(e) is dict] if type(entries) is list else []


def mutate_bundle(bundle: dict, rng: random.Random) -> None:
    """One structure-aware mutation of ``bundle``, in place."""
    op = rng.randrange(8)
    entries = _entries(bundle)
    resources = [e["resource"] for e in entries if type(e.get("resource")) is dict]
    if op == 0 or not resources:  # any node, replaced
        slots: list[tuple[Any, Any]] = []
        _nodes(bundle, slots)
        container, key = rng.choice(slots)
        container[key] = hostile_json(rng)
    elif op == 1:  # a date field, set or replaced
        rng.choice(resources)[rng.choice(DATE_KEYS)] = rng.choice(HOSTILE_DATES)
    elif op == 2:  # a period's start or end
        resource = rng.choice(resources)
        resource[rng.choice(["effectivePeriod", "onsetPeriod", "performedPeriod"])] = {
            rng.choice(["start", "end"]): rng.choice(HOSTILE_DATES)}
    elif op == 3:  # a key dropped
        resource = rng.choice(resources)
        if resource:
            del resource[rng.choice(list(resource))]
    elif op == 4:  # entries duplicated
        entry = rng.choice(entries)
        bundle["entry"].extend([entry] * rng.randrange(1, 20))
    elif op == 5:  # a resource type swapped
        rng.choice(resources)["resourceType"] = rng.choice(RESOURCE_TYPES)
    elif op == 6:  # a coding broken
        resource = rng.choice(resources)
        key = rng.choice(["code", "medicationCodeableConcept", "valueCodeableConcept", "clinicalStatus", "bodySite"])
        coding = {"system": rng.choice([hostile_string(rng), "http://snomed.info/sct",
                                        "http://needlepoint.dev/fhir/CodeSystem/injection-target"]),
                  "code": hostile_json(rng)}
        resource[key] = {"coding": [coding]} if rng.random() < 0.7 else hostile_json(rng)
    else:  # a reference or quantity broken
        resource = rng.choice(resources)
        if rng.random() < 0.5:
            resource[rng.choice(["subject", "basedOn", "medicationReference"])] = {"reference": hostile_json(rng)}
        else:
            resource["valueQuantity"] = {"value": hostile_json(rng), "unit": hostile_json(rng),
                                         "system": "http://unitsofmeasure.org", "code": hostile_json(rng)}


@dataclass
class Corpus:
    """The valid starting points: bundles (JSON text) and typed contexts."""

    bundles: list[bytes]
    contexts: list[patient_pb2.PatientContext]

    @classmethod
    def load(cls, *, synthea: bool = True, seed: int = 1) -> Corpus:
        from needlepoint.intake import context_from_record
        from tests.patients import random_patients

        bundles = [ORDER_BUNDLE.read_bytes()]
        if synthea and SYNTHEA.is_dir():
            bundles += [p.read_bytes() for p in sorted(SYNTHEA.glob("*.json"))[:2]]
        contexts = [context_from_record(r) for r in random_patients(20, seed=seed)]
        return cls(bundles, contexts)

    def bundle(self, rng: random.Random) -> tuple[dict, bool]:
        """A parsed bundle, mostly the small order-time one; and whether it needs the order."""
        k = 0 if rng.random() < 0.9 else rng.randrange(len(self.bundles))
        return orjson.loads(self.bundles[k]), k != 0


def request_bytes(
    *, bundle: bytes | None = None, context: patient_pb2.PatientContext | None = None, order: bool = False,
    correlation_id: str = "", as_of: timestamp_pb2.Timestamp | None = AS_OF, ruleset_id: str = "",
) -> bytes:
    """An EvaluateRequest, serialized."""
    request = decision_service_pb2.EvaluateRequest(correlation_id=correlation_id, ruleset_id=ruleset_id)
    if bundle is not None:
        request.fhir_bundle = bundle
    if context is not None:
        request.context.CopyFrom(context)
    if as_of is not None:
        request.as_of.CopyFrom(as_of)
    if order:
        request.order.CopyFrom(ORDER)
    return request.SerializeToString()


def _valid(corpus: Corpus, rng: random.Random, **fields: Any) -> bytes:
    """A valid request (a bundle or a context), with ``fields`` for the request."""
    if rng.random() < 0.5:
        bundle, needs_order = corpus.bundle(rng)
        return request_bytes(bundle=orjson.dumps(bundle), order=needs_order, **fields)
    return request_bytes(context=rng.choice(corpus.contexts), **fields)


# -- the kinds -----------------------------------------------------------------------------------


def gen_fhir_mutation(corpus: Corpus, rng: random.Random) -> bytes:
    bundle, needs_order = corpus.bundle(rng)
    for _ in range(rng.randrange(1, 5)):
        mutate_bundle(bundle, rng)
    return request_bytes(bundle=orjson.dumps(bundle), order=needs_order or rng.random() < 0.3)


def gen_fhir_bytes(corpus: Corpus, rng: random.Random) -> bytes:
    text = bytearray(corpus.bundles[0])
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(4)
        at = rng.randrange(len(text))
        if op == 0:
            text[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            del text[at:]
        elif op == 2:
            text[at:at] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b'"', b"{", b"]", b"\\u", b"\\ud800"])
        else:
            text[at:at] = rng.randbytes(rng.randrange(1, 16))
        if not text:
            break
    return request_bytes(bundle=bytes(text), order=True)


def _hostile_timestamp(rng: random.Random) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=rng.choice(HOSTILE_SECONDS), nanos=rng.choice(HOSTILE_NANOS))


def mutate_message(msg: Message, rng: random.Random, depth: int = 0) -> None:
    """Set one field of ``msg`` (or of a message inside it) to a hostile value, by descriptor."""
    fields = msg.DESCRIPTOR.fields
    f = rng.choice(fields)
    if f.message_type is timestamp_pb2.Timestamp.DESCRIPTOR:
        getattr(msg, f.name).CopyFrom(_hostile_timestamp(rng))
    elif f.message_type is not None:
        if f.is_repeated:
            items = getattr(msg, f.name)
            if items and rng.random() < 0.6:
                mutate_message(rng.choice(items), rng, depth + 1)
            else:
                for _ in range(rng.choice([1, 1, 2, 50])):
                    item = items.add()
                    if depth < 3:
                        mutate_message(item, rng, depth + 1)
        elif depth < 3:
            mutate_message(getattr(msg, f.name), rng, depth + 1)
    elif f.type == FieldDescriptor.TYPE_STRING:
        value = rng.choice(HOSTILE_DATES) if "date" in f.name else hostile_string(rng)
        if f.is_repeated:
            getattr(msg, f.name).append(value)
        else:
            setattr(msg, f.name, value)
    elif f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        setattr(msg, f.name, rng.choice(HOSTILE_FLOATS))
    elif f.type == FieldDescriptor.TYPE_BOOL:
        setattr(msg, f.name, rng.random() < 0.5)
    elif f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_ENUM):
        setattr(msg, f.name, rng.choice([0, 1, -1, 2**31 - 1]))


def gen_context(corpus: Corpus, rng: random.Random) -> bytes:
    context = patient_pb2.PatientContext()
    context.CopyFrom(rng.choice(corpus.contexts))
    for _ in range(rng.randrange(1, 5)):
        mutate_message(context, rng)
    return request_bytes(context=context, order=rng.random() < 0.5)


def gen_protobuf_bytes(corpus: Corpus, rng: random.Random) -> bytes:
    op = rng.randrange(7)
    if op == 0:
        return rng.randbytes(rng.randrange(0, 200))
    valid = bytearray(request_bytes(context=rng.choice(corpus.contexts), order=True))
    if op == 1:
        for _ in range(rng.randrange(1, 8)):
            valid[rng.randrange(len(valid))] ^= 1 << rng.randrange(8)
        return bytes(valid)
    if op == 2:
        return bytes(valid[: rng.randrange(len(valid))])
    if op == 3:  # invalid UTF-8 in correlation_id (field 6) or ruleset_id (field 4)
        tag = rng.choice([b"\x32", b"\x22"])
        junk = rng.choice([b"\xff\xfe", b"\xed\xa0\x80", b"\xc3", b"ok\x80"])
        return bytes(valid) + tag + bytes([len(junk)]) + junk
    if op == 4:  # a wrong wire type for a known field, or an unknown field with a big varint
        return bytes(valid) + rng.choice(
            [b"\x30\x01", b"\x1d\x00\x00\x00\x00", b"\xf8\xff\xff\xff\x0f\x01", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]
        )
    if op == 5:  # deep groups / nested messages
        depth = rng.randrange(50, 2000)
        return rng.choice([b"\x0b" * depth, b"\x0a\x7f" * depth]) + bytes(valid)
    length = rng.choice([0x7F, 0xFFFF, 0x0FFFFFFF])  # a length prefix that lies
    return bytes(valid) + b"\x12" + _varint(length) + b"{}"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def gen_correlation_id(corpus: Corpus, rng: random.Random) -> bytes:
    cid = rng.choice([
        hostile_string(rng), "CANARY\x7f", "CANARYé" * rng.randrange(1, 30), "CANARY" + "x" * rng.randrange(123, 200),
        "CANARY" * rng.randrange(22, 20000), PHI_LIKE, "ok-" + "x" * rng.randrange(0, 126), "a b ~ !",
    ])
    return _valid(corpus, rng, correlation_id=cid)


def gen_as_of(corpus: Corpus, rng: random.Random) -> bytes:
    return _valid(corpus, rng, as_of=_hostile_timestamp(rng))


def gen_request_fields(corpus: Corpus, rng: random.Random) -> bytes:
    """A valid patient with hostile request fields: rule set id and version, order override."""
    request = decision_service_pb2.EvaluateRequest.FromString(_valid(corpus, rng))
    for _ in range(rng.randrange(1, 3)):
        roll = rng.random()
        if roll < 0.3:
            request.ruleset_id = rng.choice(["hip-injection", "no-such-rules", hostile_string(rng)])
        elif roll < 0.5:
            request.ruleset_version = rng.choice(["1.0.0", "0.0.0", hostile_string(rng)])
        else:
            mutate_message(request.order, rng)
    return request.SerializeToString()


def gen_deep(corpus: Corpus, rng: random.Random) -> bytes:
    bundle, needs_order = corpus.bundle(rng)
    slots: list[tuple[Any, Any]] = []
    _nodes(bundle, slots)
    container, key = rng.choice(slots)
    container[key] = "\x00DEEP\x00"
    depth = rng.randrange(100, 1100)
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}"), ('[{"coding":', "}]")])
    deep = opener * depth + rng.choice(['"2025-06-02"', "1", "null", "[]"]) + closer * depth
    text = orjson.dumps(bundle).replace(b'"\\u0000DEEP\\u0000"', deep.encode(), 1)
    return request_bytes(bundle=text, order=needs_order)


def gen_oversized(corpus: Corpus, rng: random.Random) -> bytes:
    if rng.random() < 0.5:  # a bundle just over its limit (a message under the transport's)
        pad = b" " * (8 * MIB + 1 - len(corpus.bundles[0]))
        return request_bytes(bundle=corpus.bundles[0][:-1] + pad + b"}", order=True)
    return request_bytes(bundle=b" " * (9 * MIB + rng.randrange(1, MIB)), order=True)


GENERATORS: dict[str, Callable[[Corpus, random.Random], bytes]] = {
    "fhir-mutation": gen_fhir_mutation,
    "fhir-bytes": gen_fhir_bytes,
    "context": gen_context,
    "protobuf-bytes": gen_protobuf_bytes,
    "correlation-id": gen_correlation_id,
    "as-of": gen_as_of,
    "request-fields": gen_request_fields,
    "deep": gen_deep,
    "oversized": gen_oversized,
}
# Shares of the inputs (a stream counts as one input; its items are counted apart).
WEIGHTS = {
    "fhir-mutation": 40, "fhir-bytes": 8, "context": 15, "protobuf-bytes": 12, "correlation-id": 8,
    "as-of": 4, "request-fields": 4, "deep": 5, "oversized": 0.1, "stream": 6,
}
KINDS = list(WEIGHTS)


def stream_items(corpus: Corpus, rng: random.Random) -> list[tuple[str, bytes]]:
    """An EvaluateStream batch: two to six items of the other kinds, now and then an oversized
    one among them (the stream must answer it and go on)."""
    small = [k for k in GENERATORS if k != "oversized"]
    items = [(kind, GENERATORS[kind](corpus, rng)) for kind in rng.choices(small, k=rng.randrange(2, 7))]
    if rng.random() < 0.01:
        items.insert(rng.randrange(len(items) + 1), ("oversized", gen_oversized(corpus, rng)))
    return items


# -- checking answers ------------------------------------------------------------------------------

ACCEPTED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"}
# The transport's own limit (engine.MAX_TRANSPORT_BYTES): above it gRPC refuses the message before
# the service sees it, with a bare RESOURCE_EXHAUSTED. Counted apart, as "RESOURCE_EXHAUSTED
# (transport)", not as a failure; the generators stay below it but for a rare few.
TRANSPORT_LIMIT = 4 * (9 * MIB)


@dataclass
class Outcome:
    """What one request got: a status code name, and what is wrong with the answer (if anything)."""

    code: str
    problem: str | None = None


def check_status(code: str, message: str, violations: list[tuple[str, str]] | None, size: int = 0) -> Outcome:
    """The outcome of an answer with this status to a request of ``size`` bytes: a failure for a
    code outside ACCEPTED, for a rejection without a field path (but a message over the
    transport's limit), and for an overlong message or description."""
    if code == "OK":
        return Outcome(code)
    if code == "RESOURCE_EXHAUSTED" and not violations and size > TRANSPORT_LIMIT:
        return Outcome("RESOURCE_EXHAUSTED (transport)")
    if code not in ACCEPTED:
        return Outcome(code, f"status {code}: {message[:200]!r}")
    if not violations or not all(f for f, _ in violations):
        return Outcome(code, f"{code} without a field violation: {message[:200]!r}")
    if len(message) > MAX_TEXT or any(len(d) > MAX_TEXT for _, d in violations):
        return Outcome(code, f"{code} with a message over {MAX_TEXT} characters")
    return Outcome(code)


def violations_of(status: Any) -> list[tuple[str, str]]:
    """The BadRequest field violations of a google.rpc.Status."""
    from google.rpc import error_details_pb2

    found = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.extend((v.field, v.description) for v in bad_request.field_violations)
    return found


class GrpcRunner:
    """Sends inputs to a server over one channel (the Python client's default metadata limit,
    a receive limit large enough for any decision)."""

    def __init__(self, target: str, timeout: float = 30.0) -> None:
        import grpc

        self.grpc = grpc
        self.timeout = timeout
        # A connection of its own (not the process-wide shared one), so that several runners
        # (the soak's threads) spread over the server's workers.
        options = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.insecure_channel(target, options=options)
        grpc.channel_ready_future(self.channel).result(timeout=60)
        self.unary = self.channel.unary_unary(f"{SERVICE}/Evaluate")
        self.stream = self.channel.stream_stream(f"{SERVICE}/EvaluateStream")

    def close(self) -> None:
        self.channel.close()

    def _failure(self, error: Any, size: int) -> Outcome:
        from grpc_status import rpc_status

        code = error.code().name
        try:
            status = rpc_status.from_call(error)
        except ValueError:
            status = None
        return check_status(code, error.details() or "", violations_of(status) if status else None, size)

    def evaluate(self, data: bytes) -> Outcome:
        try:
            self.unary(data, timeout=self.timeout)
        except self.grpc.RpcError as error:
            return self._failure(error, len(data))
        return Outcome("OK")

    def evaluate_stream(self, items: list[bytes]) -> tuple[Outcome, list[Outcome]]:
        """The outcome of the call, and of each item answered."""
        from needlepoint.v1.decision_service_pb2 import EvaluateStreamResponse

        answers: list[Outcome] = []
        try:
            for raw in self.stream(iter(items), timeout=self.timeout):
                response = EvaluateStreamResponse.FromString(raw)
                if response.WhichOneof("outcome") == "decision":
                    answers.append(Outcome("OK"))
                else:
                    error = response.error
                    code = next((c.name for c in self.grpc.StatusCode if c.value[0] == error.code), "UNKNOWN")
                    answers.append(check_status(code, error.message, violations_of(error)))
        except self.grpc.RpcError as error:
            return self._failure(error, max(map(len, items), default=0)), answers
        if len(answers) != len(items):
            return Outcome("OK", f"stream answered {len(answers)} of {len(items)} items"), answers
        return Outcome("OK"), answers


class InProcessRunner:
    """The servicer's road without gRPC: the lenient deserializer, the correlation-id check, the
    engine, and the servicer's guard (INTERNAL for anything unexpected)."""

    def __init__(self) -> None:
        from needlepoint.server import wire
        from needlepoint.server.service import Engine
        from needlepoint.server.servicer import DecisionServicer, _guard

        self.wire = wire
        self.deserialize = wire.lenient_deserializer(decision_service_pb2.EvaluateRequest)
        self.servicer = DecisionServicer(Engine.load())
        self.guard = _guard

    def close(self) -> None:
        pass

    def evaluate(self, data: bytes) -> Outcome:
        from needlepoint.server.errors import ServiceError

        request = self.deserialize(data)
        if isinstance(request, self.wire.Rejected):
            outcome: Any = request.error
        else:
            outcome = self.guard("fuzz", request.correlation_id, lambda: self.servicer._checked_evaluate(request, None))
        if isinstance(outcome, ServiceError):
            violations = [(v.field, v.description) for v in outcome.violations]
            return check_status(outcome.code.name, outcome.message, violations)
        return Outcome("OK")


# -- the server under test -------------------------------------------------------------------------


class Server:
    """``needlepoint serve`` (one worker by default) on a free loopback port, its log in a file."""

    def __init__(self, log_path: Path, workers: int = 1) -> None:
        self.workers = workers
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - the server's stderr for its lifetime, closed in close()
        command = [sys.executable, "-m", "needlepoint.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", str(workers), "--grace", "2"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "service"), str(ROOT / "clients"),
                                                           os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log, env=env)

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while f"serving with {self.workers} worker" not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.log_path.read_text(errors='replace')}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def log_problems(text: str) -> dict[str, int]:
    """What must never be on the server's log, counted."""
    lines = text.splitlines()
    return {
        "tracebacks": sum("Traceback" in line for line in lines),
        "worker deaths": sum(bool(re.search(r"worker \d+ pid \d+ died", line)) for line in lines),
        "unexpected errors (INTERNAL)": sum("unexpected error" in line for line in lines),
        "lines over 2,000 characters": sum(len(line) > 2000 for line in lines),
        "invalid correlation ids written out": sum("CANARY" in line for line in lines),
    }


# -- the run ---------------------------------------------------------------------------------------


KEPT_PER_KIND = 20  # failing inputs kept (and saved) per kind


@dataclass
class Tally:
    """Counts by input kind and status code, failures kept for the report and for replay."""

    by_kind: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    failures: list[tuple[str, str, bytes | list[bytes]]] = field(default_factory=list)
    inputs: int = 0

    def add(self, kind: str, outcome: Outcome, data: bytes | list[bytes]) -> None:
        self.by_kind[kind][outcome.code] += 1
        if outcome.problem is not None:
            self.by_kind[kind]["FAILED"] += 1
            size = len(data) if isinstance(data, bytes) else sum(map(len, data))
            kept = self.by_kind[kind]["FAILED"] <= KEPT_PER_KIND and size <= 16 * MIB  # memory stays bounded
            self.failures.append((kind, outcome.problem, data if kept else b""))

    def table(self) -> str:
        codes = sorted({c for counter in self.by_kind.values() for c in counter if c != "FAILED"})
        codes.append("FAILED")
        rows = [["kind", *codes, "total"]]
        totals: collections.Counter = collections.Counter()
        for kind in sorted(self.by_kind):
            counter = self.by_kind[kind]
            total = sum(v for c, v in counter.items() if c != "FAILED")
            totals.update(counter)
            rows.append([kind, *(str(counter.get(c, 0)) for c in codes), str(total)])
        rows.append(["all", *(str(totals.get(c, 0)) for c in codes), str(sum(v for c, v in totals.items() if c != "FAILED"))])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
            for row in rows
        )


def run(runner: Any, corpus: Corpus, *, inputs: int, seconds: float, seed: int, progress: bool = True) -> Tally:
    """Send ``inputs`` generated inputs (or as many as fit in ``seconds``) through ``runner``."""
    rng = random.Random(seed)
    tally = Tally()
    kinds = [k for k in KINDS if k != "stream" or isinstance(runner, GrpcRunner)]
    weights = [WEIGHTS[k] for k in kinds]
    start = time.monotonic()
    next_report = start + 30
    for n in range(inputs):
        if time.monotonic() - start > seconds:
            break
        kind = rng.choices(kinds, weights)[0]
        if kind == "stream":
            items = stream_items(corpus, rng)
            call, answers = runner.evaluate_stream([data for _, data in items])
            tally.add("stream (call)", call, [data for _, data in items])
            for (item_kind, data), answer in zip(items, answers, strict=False):
                tally.add(f"stream item: {item_kind}", answer, data)
        else:
            data = GENERATORS[kind](corpus, rng)
            tally.add(kind, runner.evaluate(data), data)
        tally.inputs = n + 1
        if progress and time.monotonic() > next_report:
            next_report += 30
            elapsed = time.monotonic() - start
            print(f"  {tally.inputs:,} inputs in {elapsed:.0f} s, {len(tally.failures)} failures", file=sys.stderr, flush=True)
    return tally


def save_failures(tally: Tally, directory: Path, per_kind: int = KEPT_PER_KIND) -> int:
    """Write the first failures of each kind as files for replay; how many were written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: collections.Counter = collections.Counter()
    for kind, problem, data in tally.failures:
        if written[kind] >= per_kind:
            continue
        written[kind] += 1
        stem = directory / f"{kind.replace(' ', '_').replace(':', '')}-{written[kind]:03d}"
        stem.with_suffix(".txt").write_text(problem + "\n")
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            stem.with_suffix(f".{i}.bin").write_bytes(item)
    return sum(written.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs to send (default 100,000)")
    parser.add_argument("--minutes", type=float, default=float("inf"), help="stop after this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", help="host:port of a running server (default: start one)")
    parser.add_argument("--in-process", action="store_true", help="no gRPC: the servicer's code path in this process")
    parser.add_argument("--no-synthea", action="store_true", help="mutate only the small order-time bundle")
    parser.add_argument("--save", type=Path, default=Path("fuzz-failures"), help="where failing inputs go")
    args = parser.parse_args(argv)

    corpus = Corpus.load(synthea=not args.no_synthea)
    server = None
    if args.in_process:
        import logging

        logging.basicConfig(level=logging.WARNING)
        runner: Any = InProcessRunner()
        road = "in-process"
    else:
        target = args.target
        if target is None:
            server = Server(Path(tempfile.gettempdir()) / f"needlepoint-fuzz-server-{os.getpid()}.log")
            server.wait_serving()
            target = server.target
        runner = GrpcRunner(target)
        road = f"gRPC {target}"
    print(f"fuzzing {road}: up to {args.inputs:,} inputs, seed {args.seed}", file=sys.stderr)
    started = time.monotonic()
    try:
        tally = run(runner, corpus, inputs=args.inputs, seconds=args.minutes * 60, seed=args.seed)
    finally:
        runner.close()
        exit_code = server.stop() if server is not None else 0
    elapsed = time.monotonic() - started
    print(f"\n{tally.inputs:,} inputs in {elapsed:.0f} s ({tally.inputs / elapsed:.0f}/s), {road}, seed {args.seed}")
    print(tally.table())
    problems: dict[str, int] = {}
    if server is not None:
        problems = log_problems(server.log_path.read_text(errors="replace"))
        problems["server exit code not 0"] = int(exit_code != 0)
        print("\nserver log: " + ", ".join(f"{name} {count}" for name, count in problems.items()) + f" ({server.log_path})")
    if tally.failures:
        saved = save_failures(tally, args.save)
        print(f"\n{len(tally.failures)} failures; {saved} saved under {args.save}/. The first ones:")
        for kind, problem, _ in tally.failures[:10]:
            print(f"  {kind}: {problem}")
    return 1 if tally.failures or any(problems.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
