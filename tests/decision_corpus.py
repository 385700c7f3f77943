"""A recorded corpus of decisions: the proof that a refactor or a speed-up changed no answer.

Each item is one ``EvaluateRequest`` built from seeded or shared data, answered by the server's
in-process road (``server.service.Engine``: request -> patient record -> decision -> protobuf),
and kept as what a caller sees:

* ``json``: the contract JSON exactly as ``needlepoint evaluate --json`` prints it, and
* ``proto``: the SHA-256 of the deterministic protobuf encoding a gRPC caller receives,
* or, for a request the service refuses, its status code and message.

The inputs are the seeded generated patients (as typed contexts), the same kind of patients
written as FHIR order bundles (``tests/bundles.py``, each carrying its own order), every Synthea
bundle of both shared folders at two instants (2025-06-02 and the start of the patient's last
encounter) with the default order, and the order-time bundle of ``tests/data``.

Record again only when a change of answers is intended (a rule-set release), never to make the
test pass::

    python -m tests.decision_corpus --record
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from google.protobuf import json_format, timestamp_pb2

from .bundles import random_bundles
from .patients import AS_OF, random_patients
from .real_records import ORDER, bundle_id, bundle_paths, last_encounter_start

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "tests" / "data" / "decisions" / "recorded.jsonl.gz"
ORDER_BUNDLE = REPO / "tests" / "data" / "fhir" / "hip_injection_order.json"
GENERATED = 1000  # seeded patients (seed 7, the differential test's seed)
BUNDLES = 1000  # seeded order bundles (seed 11, the benchmark's)


def _timestamp(instant: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(instant.astimezone(dt.timezone.utc))
    return ts


def requests() -> Iterator[tuple[str, Any]]:
    """(id, EvaluateRequest) for every item of the corpus, in a stable order."""
    from needlepoint.intake import context_from_record
    from needlepoint.v1 import decision_service_pb2, patient_pb2

    order = patient_pb2.InjectionOrder(**ORDER)
    as_of = _timestamp(AS_OF)
    for i, record in enumerate(random_patients(GENERATED, seed=7)):
        yield f"generated:{i:04d}", decision_service_pb2.EvaluateRequest(context=context_from_record(record), as_of=as_of)
    for i, bundle in enumerate(random_bundles(BUNDLES)):
        yield f"bundle:{i:04d}", decision_service_pb2.EvaluateRequest(fhir_bundle=orjson.dumps(bundle), as_of=as_of)
    yield "fhir:hip_injection_order", decision_service_pb2.EvaluateRequest(fhir_bundle=ORDER_BUNDLE.read_bytes(), as_of=as_of)
    for path in bundle_paths():
        raw = path.read_bytes()
        instants = {"2025-06-02": AS_OF}
        last = last_encounter_start(orjson.loads(raw))
        if last is not None:
            instants["last-encounter"] = last
        for label, instant in instants.items():
            request = decision_service_pb2.EvaluateRequest(fhir_bundle=raw, as_of=_timestamp(instant), order=order)
            yield f"{bundle_id(path)}@{label}", request


def answer(engine: Any, request: Any) -> dict[str, str]:
    """What a caller receives for ``request``: the decision's two encodings, or the refusal."""
    from needlepoint.server.errors import ServiceError

    try:
        decision = engine.evaluate(request)
    except ServiceError as exc:
        return {"error": f"{exc.code.name}: {exc.message}"}
    text = json.dumps(json_format.MessageToDict(decision), indent=2, ensure_ascii=False)
    return {"json": text, "proto": hashlib.sha256(decision.SerializeToString(deterministic=True)).hexdigest()}


def compute(engine: Any | None = None) -> dict[str, dict[str, str]]:
    """Every item's answer, by id, from the code as it is now."""
    from needlepoint.server.service import Engine

    engine = engine or Engine.load()
    out: dict[str, dict[str, str]] = {}
    for item_id, request in requests():
        assert item_id not in out, f"duplicate corpus id {item_id}"
        out[item_id] = answer(engine, request)
    return out


def load(path: Path = RECORDED) -> dict[str, dict[str, str]]:
    with gzip.open(path, "rb") as fh:
        return {item["id"]: {k: v for k, v in item.items() if k != "id"} for item in map(orjson.loads, fh)}


def save(corpus: dict[str, dict[str, str]], path: Path = RECORDED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same answers give the same file, so an unchanged corpus is no change to commit
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as fh:
        for item_id, item in corpus.items():
            fh.write(orjson.dumps({"id": item_id, **item}) + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help=f"write the corpus to {RECORDED.relative_to(REPO)}")
    args = parser.parse_args(argv)
    corpus = compute()
    errors = sum("error" in item for item in corpus.values())
    if args.record:
        save(corpus)
        print(f"recorded {len(corpus)} answers ({errors} refusals) in {RECORDED.relative_to(REPO)}")
        return 0
    recorded = load()
    changed = sorted(k for k in corpus.keys() | recorded.keys() if corpus.get(k) != recorded.get(k))
    print(f"{len(corpus)} answers, {len(changed)} differ from the recording")
    for item_id in changed[:20]:
        print(f"  {item_id}")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
