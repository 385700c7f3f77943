"""In-process decisions per second per core, on the three roads a decision takes without gRPC.

    python bench/inprocess.py                          # this tree
    python bench/inprocess.py --baseline ../main       # this tree against another checkout, interleaved
    python bench/inprocess.py --json                   # one JSON object, for scripts/bench
    python bench/inprocess.py --profile order          # cProfile of one road in this tree

Roads (the bundled rule set):

* ``order``: FHIR order bundles as request bytes to a protobuf ``Decision``, through
  ``server.service.Engine.evaluate`` as the gRPC servicer calls it. The inputs are 200 distinct
  seeded order bundles (``tests/bundles.py``, those of the gRPC benchmark), each at a seeded
  instant; a checkout without that generator uses its one order-time bundle
  (tests/data/fhir/hip_injection_order.json) at 200 instants.
* ``record``: a mapped ``PatientRecord`` (1,000 seeded generated patients, ``tests/patients.py``)
  to a protobuf ``Decision``: the evaluator and the decision encoder the server uses.
* ``synthea``: every Synthea bundle of ``../shared/fixtures`` (0.1 to 3 MB each) with the default
  order, as request bytes to a ``Decision`` through ``Engine.evaluate``.

Each tree runs in a child process of its own, and every measurement is a batch of decisions timed
with ``time.process_time`` (CPU of that process only, so other load on a shared machine slows it
less than wall time would). Batches alternate between trees and roads (round r: tree A order,
tree B order, tree A record, ...), so a slow spell of the machine falls on both trees alike. Per
road and tree the report gives the median of the repeats and their spread (min to max). Every
decision is checked to carry the bundled rule set's digest; a refusal fails the run. A run takes
about 15 s per tree (9 rounds), 30 s with a baseline.

``--json`` prints ``{"machine", "date", "unit", "results": {tree: {road: {"median", "min", "max",
"runs"}}}}`` for a caller such as ``scripts/bench``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROADS = ("order", "record", "synthea")
BATCH = {"order": 300, "record": 500, "synthea": 47}  # about 0.1 to 0.2 s of CPU each
AS_OF = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.timezone.utc)
ORDER = {"target": "hip-intra-articular", "side": "right", "intent": "therapeutic"}


def _shared() -> Path:
    return Path(os.environ.get("NEEDLEPOINT_SHARED") or ROOT.parent / "shared")


# -- the child: one tree, driven over stdin/stdout -------------------------------------------------


class Roads:
    """The inputs and the decision function of each road, in the tree on ``sys.path``."""

    def __init__(self, seed: int) -> None:
        from google.protobuf import timestamp_pb2

        from needlepoint.server import convert
        from needlepoint.server.service import Engine
        from needlepoint.v1 import decision_service_pb2, patient_pb2
        from tests.patients import random_patients

        self.engine = Engine.load()
        self.evaluator = self.engine.evaluator("hip-injection")
        self.digest = self.evaluator.ruleset.digest
        rng = random.Random(seed)

        def stamp(instant: dt.datetime) -> timestamp_pb2.Timestamp:
            ts = timestamp_pb2.Timestamp()
            ts.FromDatetime(instant)
            return ts

        try:  # 200 distinct seeded order bundles (the gRPC benchmark's), each with its own order
            import orjson

            from tests.bundles import random_bundles

            order_bundles = [orjson.dumps(bundle) for bundle in random_bundles(200, seed=seed)]
        except ImportError:  # an older checkout: its one order-time bundle, at 200 instants
            one = (ROOT / "tests" / "data" / "fhir" / "hip_injection_order.json").read_bytes()
            order_bundles = [one] * 200
        self.inputs: dict[str, list] = {
            "order": [
                decision_service_pb2.EvaluateRequest(
                    fhir_bundle=bundle, as_of=stamp(AS_OF + dt.timedelta(minutes=rng.randrange(0, 60 * 24 * 60)))
                )
                for bundle in order_bundles
            ],
            "record": random_patients(1000, seed=seed),
            "synthea": [
                decision_service_pb2.EvaluateRequest(
                    fhir_bundle=path.read_bytes(), as_of=stamp(AS_OF), order=patient_pb2.InjectionOrder(**ORDER)
                )
                for folder in ("synthea", "synthea-r4-sample")
                for path in sorted((_shared() / "fixtures" / folder).glob("*.json"))
            ],
        }
        if not self.inputs["synthea"]:
            raise SystemExit(f"no Synthea bundles under {_shared() / 'fixtures'}")
        rng.shuffle(self.inputs["synthea"])
        self.position = dict.fromkeys(ROADS, 0)
        evaluator = self.evaluator
        if hasattr(evaluator, "decide") and hasattr(convert, "encode_decision"):  # typed decisions
            encode = convert.encode_decision
            self.decide_record = lambda record: encode(evaluator.decide(record, AS_OF))
        else:
            self.decide_record = lambda record: convert.decision_to_proto(evaluator.evaluate(record, AS_OF))

    def run(self, road: str, n: int) -> float:
        """Decide ``n`` inputs of ``road`` (cycling through them); the CPU seconds it took."""
        inputs, start = self.inputs[road], self.position[road]
        batch = [inputs[(start + i) % len(inputs)] for i in range(n)]
        self.position[road] = (start + n) % len(inputs)
        decide = self.decide_record if road == "record" else self.engine.evaluate
        t0 = time.process_time()
        decisions = [decide(item) for item in batch]
        spent = time.process_time() - t0
        for decision in decisions:
            if decision.ruleset.digest != self.digest:
                raise SystemExit(f"{road}: a decision with rule-set digest {decision.ruleset.digest!r}")
        return spent


def child(seed: int) -> None:
    roads = Roads(seed)
    print("ready", flush=True)
    for line in sys.stdin:
        road, n = line.split()
        print(repr(roads.run(road, int(n))), flush=True)


# -- the parent ----------------------------------------------------------------------------------------


class Tree:
    """A child process evaluating with the code of one checkout."""

    def __init__(self, label: str, checkout: Path, seed: int) -> None:
        self.label, self.checkout = label, checkout
        env = dict(os.environ)
        # the checkout's code first; this tree's tests/ for the seeded patients
        env["PYTHONPATH"] = os.pathsep.join([str(checkout / "service"), str(ROOT)])
        env["NEEDLEPOINT_SHARED"] = str(_shared())
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", "--seed", str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, cwd=str(checkout),
        )  # fmt: skip
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{label}: the child did not start (see above)")

    def run(self, road: str, n: int) -> float:
        self.proc.stdin.write(f"{road} {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.label}: the child failed on {road} (see above)")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def machine(*, load: bool = False) -> str:
    """The CPU model, its cores and the Python; with ``load``, the load average now too."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{model}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    if load and hasattr(os, "getloadavg"):
        text += f", load {os.getloadavg()[0]:.2f}"
    return text


def measure(trees: list[Tree], roads: tuple[str, ...], repeats: int, scale: float) -> dict[str, dict[str, list[float]]]:
    """Decisions per CPU second for every tree and road, ``repeats`` interleaved rounds each."""
    rates: dict[str, dict[str, list[float]]] = {t.label: {r: [] for r in roads} for t in trees}
    for road in roads:  # warm-up: first calls, caches, the allocator
        for tree in trees:
            tree.run(road, max(1, int(BATCH[road] * scale) // 2))
    for r in range(repeats):
        order = trees if r % 2 == 0 else trees[::-1]
        for road in roads:
            n = max(1, int(BATCH[road] * scale))
            for tree in order:
                rates[tree.label][road].append(n / tree.run(road, n))
    return rates


def report(rates: dict[str, dict[str, list[float]]], roads: tuple[str, ...]) -> str:
    labels = list(rates)
    lines = [f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine(load=True)}", ""]
    head = "| road | " + " | ".join(f"{label}: decisions/s per core, median (min-max)" for label in labels)
    if len(labels) == 2:
        head += f" | {labels[1]} / {labels[0]}"
    lines += [head + " |", "|---" * (len(labels) + 1 + (len(labels) == 2)) + "|"]
    for road in roads:
        cells = []
        for label in labels:
            values = rates[label][road]
            cells.append(f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})")
        if len(labels) == 2:
            a, b = (statistics.median(rates[label][road]) for label in labels)
            cells.append(f"{b / a:.2f}x")
        lines.append(f"| {road} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile(road: str, seed: int, n: int) -> None:
    import cProfile
    import pstats

    sys.path[:0] = [str(ROOT / "service"), str(ROOT)]
    roads = Roads(seed)
    roads.run(road, n // 4)
    prof = cProfile.Profile()
    prof.enable()
    roads.run(road, n)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(35)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with, interleaved")
    parser.add_argument("--roads", default=",".join(ROADS), help=f"comma-separated, of {', '.join(ROADS)}")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--scale", type=float, default=1.0, help="batch size factor (default 1)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--profile", choices=ROADS, help="cProfile one road in this process instead")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.seed)
        return 0
    if args.profile:
        profile(args.profile, args.seed, int(BATCH[args.profile] * 4 * args.scale))
        return 0
    roads = tuple(r for r in args.roads.split(",") if r)
    unknown = [r for r in roads if r not in ROADS]
    if unknown:
        parser.error(f"unknown road {unknown[0]!r}; expected {', '.join(ROADS)}")
    trees = []
    try:
        if args.baseline is not None:
            trees.append(Tree("baseline", args.baseline.resolve(), args.seed))
        trees.append(Tree("this tree", ROOT, args.seed))
        rates = measure(trees, roads, args.repeats, args.scale)
    finally:
        for tree in trees:
            tree.close()
    if args.json:
        out = {
            "machine": machine(load=True),
            "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
            "unit": "decisions per CPU second",
            "results": {
                label: {
                    road: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for road, v in per.items()
                }
                for label, per in rates.items()
            },
        }
        print(json.dumps(out, indent=2))
    else:
        print(report(rates, roads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
