"""Heavy records: how evaluation cost grows with the size of a record. Not a test; prints figures.

    python bench/heavy.py [--sizes 1000,2000,...] [--kinds conditions,warfarin,...] [--explain]

Each record is the order-time bundle (tests/data/fhir/hip_injection_order.json) with N extra
resources of one kind, all of which the rules read: hip osteoarthritis conditions (each coded
differently, dated differently), warfarin prescriptions (each authored on a different day, each
naming a Medication with a long display), prior steroid injections into the same hip, or uncoded
conditions (each a data issue). For each size it reports the bundle's bytes and the time from
bytes to decision (mapping included, with the garbage collector paused as the server does for a
large request), median of a few runs, and the size of the decision; with
``--explain``, also the time of ``explain`` with every counterfactual. Cost that grows linearly
keeps time/N flat as N doubles.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
ORDER_BUNDLE = ROOT / "tests" / "data" / "fhir" / "hip_injection_order.json"
AS_OF = dt.datetime(2025, 6, 2, 9, tzinfo=dt.timezone.utc)
LONG_DISPLAY = "Warfarin Sodium 5 MG Oral Tablet " + "x" * 2000


def _day(i: int) -> str:
    return (dt.date(2025, 5, 1) - dt.timedelta(days=i % 3000)).isoformat()


def _resources(kind: str, n: int) -> list[dict]:
    """``n`` resources of ``kind``, all referring to the order bundle's patient."""
    subject = {"reference": "Patient/pat-1"}
    out: list[dict] = []
    if kind == "warfarin":
        out.append({"resourceType": "Medication", "id": "warfarin", "code": {"coding": [
            {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "855332", "display": LONG_DISPLAY}]}})
    for i in range(n):
        if kind == "conditions":
            out.append(
                {
                    "resourceType": "Condition",
                    "id": f"c{i}",
                    "subject": subject,
                    "onsetDateTime": _day(i),
                    "clinicalStatus": {"coding": [{"code": "active"}]},
                    "code": {
                        "coding": [
                            {
                                "system": "http://hl7.org/fhir/sid/icd-10-cm",
                                "code": f"M16.{i % 10}",
                                "display": f"Osteoarthritis of hip {i}",
                            }
                        ]
                    },
                }
            )
        elif kind == "warfarin":
            out.append(
                {
                    "resourceType": "MedicationRequest",
                    "id": f"m{i}",
                    "status": "active",
                    "intent": "order",
                    "subject": subject,
                    "authoredOn": _day(i),
                    "medicationReference": {"reference": "Medication/warfarin"},
                }
            )
        elif kind == "injections":
            out.append(
                {
                    "resourceType": "Procedure",
                    "id": f"p{i}",
                    "status": "completed",
                    "subject": subject,
                    "performedDateTime": _day(i),
                    "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "20610"}]},
                    "bodySite": [
                        {
                            "coding": [
                                {
                                    "system": "http://needlepoint.dev/fhir/CodeSystem/injection-target",
                                    "code": "hip-intra-articular",
                                },
                                {"system": "http://snomed.info/sct", "code": "24028007"},
                            ]
                        }
                    ],
                    "usedCode": [{"coding": [{"system": "http://www.whocc.no/atc", "code": "H02AB08"}]}],
                }
            )
        elif kind == "uncoded":
            out.append({"resourceType": "Condition", "id": f"u{i}", "subject": subject, "recordedDate": _day(i),
                        "code": {"text": f"something the clinician typed {i}"}})
        else:
            raise SystemExit(f"unknown kind {kind}")
    return out


def bundle(kind: str, n: int) -> bytes:
    base = json.loads(ORDER_BUNDLE.read_text())
    heavy = copy.deepcopy(base)
    heavy["entry"] += [{"resource": r} for r in _resources(kind, n)]
    return orjson.dumps(heavy)


def _time(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,4000,8000,16000,32000,64000")
    parser.add_argument("--kinds", default="conditions,warfarin,injections,uncoded")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--explain", action="store_true", help="also time explain with counterfactuals")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="skip larger sizes of a kind once one run takes longer")
    args = parser.parse_args()

    from needlepoint.core.evaluator import Evaluator
    from needlepoint.fhir.mapper import record_from_bundle
    from needlepoint.limits import LARGE_REQUEST_BYTES
    from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset
    from needlepoint.server.service import collector_paused

    evaluator = Evaluator(load_ruleset(bundled_rulesets_dir() / "hip-injection"))

    def decide(data: bytes) -> dict:
        # as the server evaluates a request over 256 KiB: the cyclic collector paused (server/service.py)
        with collector_paused(len(data) > LARGE_REQUEST_BYTES, len(data)):
            return evaluator.evaluate(record_from_bundle(data), AS_OF)

    print(
        f"{'kind':<11} {'N':>6} {'bundle':>9} {'decide':>9} {'µs/N':>7} {'decision':>10}"
        + (f" {'explain':>9}" if args.explain else "")
    )
    for kind in args.kinds.split(","):
        for n in map(int, args.sizes.split(",")):
            data = bundle(kind, n)
            decision = decide(data)
            seconds = _time(partial(decide, data), args.repeat)
            line = (
                f"{kind:<11} {n:>6} {len(data) / 1048576:>7.2f}MB {seconds * 1000:>7.0f}ms {seconds / n * 1e6:>7.1f} "
                f"{len(orjson.dumps(decision)) / 1024:>8.0f}KB"
            )
            if args.explain:
                from needlepoint.core.explain import counterfactuals

                record = record_from_bundle(data)
                with collector_paused(len(data) > LARGE_REQUEST_BYTES, len(data)):
                    line += f" {_time(partial(counterfactuals, evaluator, record, AS_OF), 1) * 1000:>7.0f}ms"
            print(line, flush=True)
            if seconds > args.max_seconds:
                print(f"{kind}: stopping, one run took {seconds:.0f}s", file=sys.stderr)
                break


if __name__ == "__main__":
    main()
