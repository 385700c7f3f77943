"""Evaluate a FHIR R4 Bundle on a running Needlepoint server and print the decision JSON.

    needlepoint serve --host 127.0.0.1 --port 50051 &
    python clients/examples/evaluate_bundle.py patient.json \\
        --target hip-intra-articular --side right --intent therapeutic

Against a server with TLS and token authentication, add ``--tls-ca ca.pem`` and put the bearer
token in ``$NEEDLEPOINT_TOKEN``.

Exit codes: 0 a decision, 2 the server could not evaluate the bundle (each offending field is
printed), 1 the call failed (server unreachable, deadline).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from needlepoint_client import (
    EvaluationError,
    InjectionOrder,
    NeedlepointClient,
    NeedlepointError,
    decision_to_json,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a FHIR R4 Bundle as JSON")
    parser.add_argument("--server", default="localhost:50051", help="host:port (default: %(default)s)")
    parser.add_argument("--as-of", type=dt.datetime.fromisoformat, help="evaluation instant, ISO 8601 with zone")
    parser.add_argument("--target", default="", help="injection target code, e.g. hip-intra-articular")
    parser.add_argument("--side", default="", help="left, right or both")
    parser.add_argument("--intent", default="", help="e.g. therapeutic")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    parser.add_argument("--tls-ca", type=Path, help="connect over TLS, trusting this PEM CA bundle")
    args = parser.parse_args(argv)
    token = os.environ.get("NEEDLEPOINT_TOKEN")  # a bearer token; never on the command line

    order = None
    if args.target or args.side or args.intent:
        order = InjectionOrder(target=args.target, side=args.side, intent=args.intent)
    with NeedlepointClient(args.server, timeout=args.timeout, tls_ca=args.tls_ca, token=token) as client:
        try:
            decision = client.evaluate_bundle(args.bundle.read_bytes(), as_of=args.as_of, order=order)
        except EvaluationError as error:
            print(f"cannot evaluate: {error.message}", file=sys.stderr)
            for violation in error.field_violations:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
            return 2
        except NeedlepointError as error:
            print(f"call failed: {error.code.name}: {error.message}", file=sys.stderr)
            return 1
    print(decision_to_json(decision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
