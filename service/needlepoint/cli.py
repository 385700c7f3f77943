"""The ``needlepoint`` command: run the server, or evaluate a FHIR Bundle from the shell.

``needlepoint evaluate`` builds the same EvaluateRequest whether it evaluates in-process or
through ``--server``, and renders the same Decision message, so both print identical JSON and
fail with identical messages. Exit codes: 0 a decision, 2 input that cannot be evaluated (the
message is the gRPC error's ``path: problem``), 1 anything else (server unreachable, broken rule
set).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

import click

from needlepoint import __version__
from needlepoint.authoring.explain import command as explain_command
from needlepoint.cli_options import order_options, parse_instant
from needlepoint.cli_decisions import DATABASE_OPTION, MASK_OPTION, decisions, migrate_for_serve
from needlepoint.cli_rules import rules
from needlepoint.rulesets import DEFAULT_RULESET

if TYPE_CHECKING:
    from needlepoint.v1.decision_pb2 import Decision
    from needlepoint.v1.decision_service_pb2 import EvaluateRequest

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

_RULESETS_OPTION = click.option(
    "--rulesets",
    "rulesets_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of rule sets, one per subdirectory with a ruleset.yaml (default: the bundled ones).",
)


@click.group()
@click.version_option(__version__, prog_name="needlepoint")
def main() -> None:
    """Needlepoint: decision support for image-guided hip injections."""


main.add_command(rules)
main.add_command(explain_command)
main.add_command(decisions)


@main.command()
@click.option("--host", default="[::]", show_default=True, help="Address to bind (all interfaces by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=50051, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=os.cpu_count() or 1,
    show_default="number of CPUs",
    help="Worker processes sharing the port (SO_REUSEPORT); a worker that dies is replaced.",
)
@_RULESETS_OPTION
@click.option("--grace", type=click.FloatRange(0), default=10.0, show_default=True, help="Seconds to drain on SIGTERM.")
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), default="INFO"
)
@click.option("--watch", is_flag=True, help="Hot-reload rule sets that change on disk (validated, tested, then swapped in).")
@click.option("--watch-interval", type=click.FloatRange(0.1), default=2.0, show_default=True, help="Seconds between looks at the rule sets.")
@DATABASE_OPTION
@MASK_OPTION
def serve(
    host: str, port: int, workers: int, rulesets_dir: Path | None, grace: float, log_level: str, watch: bool, watch_interval: float,
    database: str | None, mask: str,
) -> None:
    """Serve the gRPC API until SIGTERM.

    A supervisor runs WORKERS processes that share the port; each serves needlepoint.v1.DecisionService,
    grpc.health.v1 and server reflection. On SIGTERM or Ctrl-C in-flight calls get --grace seconds.
    With --watch, a rule set that changes on disk is linted and run against its own test cases in a
    separate process; only then is it loaded and swapped in, and a rule set that fails keeps the
    previous version serving (GetRuleset reports why). Earlier versions stay loaded for pinning.
    Every decision is committed to the decision log (--database; 'none' for no log) before it is
    answered; its schema is migrated first.
    """
    from needlepoint.server.supervisor import Supervisor
    from needlepoint.server.worker import WorkerConfig, setup_logging

    setup_logging(log_level)
    config = WorkerConfig(
        host=host, port=port, rulesets_dir=rulesets_dir, grace=grace, log_level=log_level, watch=watch, watch_interval=watch_interval,
        database=migrate_for_serve(database, mask),
        mask=mask,
    )
    sys.exit(Supervisor(config, workers).run())


@main.command()
@click.argument("file", type=click.File("rb"))
@click.option("--as-of", callback=parse_instant, help="Evaluation instant, ISO 8601 (default: now; UTC if no zone).")
@order_options("supplies or overrides the order's.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision JSON, nothing else.")
@click.option("--server", metavar="HOST:PORT", help="Evaluate on a running server instead of in-process.")
@click.option("--ruleset", "ruleset_id", default=DEFAULT_RULESET, show_default=True, help="Rule set id.")
@_RULESETS_OPTION
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Deadline in seconds for --server.")
@click.option("--record", is_flag=True, help="Commit the in-process decision to the decision log (a server logs its own).")
@DATABASE_OPTION
@MASK_OPTION
def evaluate(
    file: BinaryIO,
    as_of: dt.datetime | None,
    target: str | None,
    side: str | None,
    intent: str | None,
    as_json: bool,
    server: str | None,
    ruleset_id: str,
    rulesets_dir: Path | None,
    timeout: float,
    record: bool,
    database: str | None,
    mask: str,
) -> None:
    """Evaluate the FHIR R4 Bundle in FILE ('-' for standard input).

    In-process by default, or on a running server with --server; both print the same decision.
    Exit code 2 when the bundle cannot be evaluated, with the reason on standard error.
    """
    from needlepoint_client import InjectionOrder, decision_to_dict, decision_to_json, make_request

    order = None
    if target or side or intent:
        order = InjectionOrder(target=target or "", side=side or "", intent=intent or "")
    request = make_request(fhir_bundle=file.read(), as_of=as_of, order=order, ruleset_id=ruleset_id)
    decision = _remote(server, request, timeout) if server else _in_process(rulesets_dir, request)
    if record and not server:
        from needlepoint.cli_decisions import record_cli_decision

        record_cli_decision(database, mask, request, decision)
    if as_json:
        click.echo(decision_to_json(decision))
    else:
        print_summary(decision_to_dict(decision))


def _remote(server: str, request: EvaluateRequest, timeout: float) -> Decision:
    from needlepoint_client import EvaluationError, NeedlepointClient, NeedlepointError

    with NeedlepointClient(server, timeout=timeout) as client:
        try:
            return client.evaluate(request)
        except EvaluationError as exc:
            _fail(exc.message, EXIT_BAD_INPUT)
        except NeedlepointError as exc:
            _fail(f"{server}: {exc.code.name}: {exc.message}", EXIT_FAILURE)


def _in_process(rulesets_dir: Path | None, request: EvaluateRequest) -> Decision:
    import grpc

    from needlepoint.server.engine import Engine
    from needlepoint.server.errors import ServiceError

    try:
        engine = Engine.load(rulesets_dir)
    except Exception as exc:  # a broken rule set: say what, without a traceback
        _fail(f"cannot load rule sets: {exc}", EXIT_FAILURE)
    try:
        return engine.evaluate(request)
    except ServiceError as exc:
        bad_input = exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        _fail(exc.message, EXIT_BAD_INPUT if bad_input else EXIT_FAILURE)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# -- the summary for a referral coordinator -----------------------------------------------------

REASONS = {
    "JOINT_INFECTION_SUSPECTED": "Possible infection of the hip joint",
    "SYSTEMIC_INFECTION": "Infection elsewhere in the body, or fever",
    "ENTRY_SITE_INFECTION": "Skin infection where the needle would go in",
    "BLEEDING_RISK": "Bleeding risk (blood thinners or clotting results)",
    "INJECTATE_ALLERGY": "Allergy to a planned injection medicine",
    "RECENT_CORTICOSTEROID_INJECTION": "A steroid injection was given too recently",
    "UPCOMING_ARTHROPLASTY": "Hip replacement surgery is planned soon",
    "HYPERGLYCEMIA": "Blood sugar too high for a steroid injection",
    "PREGNANCY": "Pregnancy, or pregnancy status not known",
    "TARGET_MISMATCH": "The injection site does not fit the diagnosis or purpose",
    "CONSERVATIVE_CARE_INCOMPLETE": "Treatment without injections not yet tried long enough",
    "PENDING_DATA": "Waiting for missing or out-of-date results",
    "PATIENT_DECEASED": "The record says the patient has died",
}
MODALITIES = {"FLUOROSCOPY": "Fluoroscopy (X-ray)", "ULTRASOUND": "Ultrasound", "LANDMARK": "Landmark (no imaging)"}
INJECTATES = {
    "LOCAL_ANESTHETIC": "Local anaesthetic",
    "CORTICOSTEROID": "Corticosteroid (steroid)",
    "HYALURONIC_ACID": "Hyaluronic acid",
    "PLATELET_RICH_PLASMA": "Platelet-rich plasma",
    "IODINATED_CONTRAST": "Iodinated contrast (X-ray dye)",
    "GADOLINIUM_CONTRAST": "Gadolinium contrast (MRI dye)",
}
RECOMMENDATIONS = {
    "SUGGESTED": "[green]suggested[/]",
    "CAUTION": "[yellow]use with caution[/]",
    "NOT_SUGGESTED": "[yellow]not suggested[/]",
    "AVOID": "[red]avoid[/]",
}


def _words(table: dict[str, str], name: str) -> str:
    """The plain words of an enum value name (the name itself, readable, for new values)."""
    return table.get(name, name.replace("_", " ").capitalize())


def print_summary(decision: dict[str, Any]) -> None:
    """A readable summary of a decision (the contract's JSON object) for a referral coordinator:
    can the procedure go ahead now, and if not why, then guidance, injectates, cautions and
    missing data."""
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding
    from rich.table import Table

    console = Console(highlight=False)
    titles = {e["ruleId"]: e.get("title", e["ruleId"]) for e in decision.get("explanations", [])}

    def section(heading: str) -> None:
        console.print(f"\n[bold]{heading}[/]")

    def item(head: str, *details: str) -> None:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=1)
        grid.add_column()
        grid.add_row("-", head)
        for detail in filter(None, details):
            grid.add_row("", detail)
        console.print(Padding(grid, (0, 0, 0, 2), expand=False))

    def rule_titles(entry: dict[str, Any]) -> str:
        names = "; ".join(titles.get(r, r) for r in entry.get("ruleIds", []))
        return f"[dim]Rule: {escape(names)}[/]" if names else ""

    ruleset = decision.get("ruleset", {})
    console.print(
        f"Decision {escape(decision.get('decisionId', ''))} as of {decision.get('asOf', '')}"
        f" (rule set {escape(ruleset.get('id', ''))} {escape(ruleset.get('version', ''))})"
    )
    deferrals = decision.get("deferrals", [])
    whole = [d for d in deferrals if d.get("scope") == "PROCEDURE"]
    if any(d.get("severity") == "HARD" for d in whole):
        console.print("[bold red]NOT NOW:[/] the injection should be deferred for the reasons below.")
    elif whole:
        console.print("[bold yellow]ONLY AFTER CLINICIAN REVIEW:[/] a clinician must review the reasons below first.")
    elif deferrals:
        console.print("[bold green]CAN GO AHEAD[/], without the injectates held back below.")
    else:
        console.print("[bold green]CAN GO AHEAD[/] as far as the rules can tell.")
    if deferrals:
        section("Reasons to wait")
        for d in deferrals:
            scope = d.get("scope", "PROCEDURE")
            firmness = "not now" if d.get("severity") == "HARD" else "after clinician review"
            applies = "the whole procedure" if scope == "PROCEDURE" else _words(INJECTATES, scope).lower()
            head = f"[bold]{_words(REASONS, d.get('reason', ''))}[/] ({firmness}; {applies})"
            item(head, rule_titles(d), escape(d.get("message", "")))
    modality = decision.get("modality")
    if modality:
        section("Image guidance")
        line = f"{_words(MODALITIES, modality.get('preferred', ''))} preferred"
        if modality.get("acceptable"):
            line += "; also acceptable: " + ", ".join(_words(MODALITIES, m) for m in modality["acceptable"])
        if modality.get("avoid"):
            line += "; avoid: " + ", ".join(_words(MODALITIES, m) for m in modality["avoid"])
        item(line, rule_titles(modality))
    if decision.get("injectates"):
        section("Injectates")
        for i in decision["injectates"]:
            recommendation = i.get("recommendation", "")
            advice = RECOMMENDATIONS.get(recommendation, escape(recommendation))
            head = f"{_words(INJECTATES, i.get('category', ''))}: {advice}"
            item(head, escape(i.get("message", "")))
    if decision.get("cautions"):
        section("Cautions")
        for caution in decision["cautions"]:
            item(escape(caution.get("message") or caution.get("code", "")))
    if decision.get("missingData"):
        section("Missing data")
        for missing in decision["missingData"]:
            item(f"[bold]{escape(missing.get('code', ''))}[/]: {escape(missing.get('message', ''))}")


if __name__ == "__main__":
    main()
