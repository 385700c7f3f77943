"""``needlepoint evaluate``: in-process and through ``--server`` it prints the same decision JSON as
the gRPC API, and fails on bad input with exit code 2 and the gRPC error's message."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from click.testing import CliRunner, Result
from google.protobuf import json_format, timestamp_pb2

from needlepoint.cli import main
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc, patient_pb2

if TYPE_CHECKING:
    from conftest import Sample, ServerProcess

pytestmark = pytest.mark.slow


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["evaluate", *args])


@pytest.fixture(scope="module")
def malformed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bundles") / "malformed.json"
    path.write_text('{"resourceType": "Bundle", "entry": [')
    return path


@pytest.fixture(scope="module")
def local_json(mafalda: Sample) -> str:
    result = run(str(mafalda.path), "--as-of", mafalda.as_of, *mafalda.order_args, "--json")
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_json_equals_the_grpc_decision(grpc_server: ServerProcess, mafalda: Sample, local_json: str) -> None:
    as_of = timestamp_pb2.Timestamp()
    as_of.FromJsonString(mafalda.as_of)
    request = decision_service_pb2.EvaluateRequest(
        fhir_bundle=mafalda.bundle, as_of=as_of, order=patient_pb2.InjectionOrder(**mafalda.order)
    )
    with grpc.insecure_channel(grpc_server.target) as channel:
        decision = decision_service_pb2_grpc.DecisionServiceStub(channel).Evaluate(request, timeout=10)
    assert json.loads(local_json) == json_format.MessageToDict(decision)
    assert "PENDING_DATA" in {d["reason"] for d in json.loads(local_json)["deferrals"]}


def test_json_is_byte_identical_in_process_and_remote(
    grpc_server: ServerProcess, mafalda: Sample, local_json: str
) -> None:
    args = [str(mafalda.path), "--as-of", mafalda.as_of, *mafalda.order_args, "--json"]
    remote = run(*args, "--server", grpc_server.target)
    assert remote.exit_code == 0, remote.stderr
    assert remote.stdout == local_json


def test_summary_speaks_plainly(mafalda: Sample, local_json: str) -> None:
    """The text gives the verdict, the reason in plain words with its specifics, and no rule ids,
    missing-data codes or raw codes; the INR request is said once although the decision holds it
    twice (the PENDING_DATA deferral and the INR missing-data entry)."""
    decision = json.loads(local_json)
    pending = next(d for d in decision["deferrals"] if d["reason"] == "PENDING_DATA")
    result = run(str(mafalda.path), "--as-of", mafalda.as_of, *mafalda.order_args)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "NOT NOW" in text and "A result or detail is missing: not now." in text
    assert pending["message"] in text and text.count(pending["message"]) == 1
    assert "obtain an INR taken no earlier than" in pending["message"]
    rule_ids = {e["ruleId"] for e in decision["explanations"]}
    codes = {m["code"] for m in decision.get("missingData", [])} | {c["code"] for c in decision.get("cautions", [])}
    codes = {code for code in codes if not code.isalpha()}  # internal codes, not words such as INR
    assert codes and not [token for token in rule_ids | codes if token in text]
    assert "#" not in text and "{" not in text
    assert "Corticosteroid" in text


def test_piped_summary_is_neither_padded_wrapped_nor_coloured(mafalda: Sample, local_json: str) -> None:
    decision = json.loads(local_json)
    result = run(str(mafalda.path), "--as-of", mafalda.as_of, *mafalda.order_args)
    lines = result.stdout.splitlines()
    assert "\x1b" not in result.stdout
    assert all(line == line.rstrip() for line in lines)
    # every message is one whole line, however long
    messages = [i["message"] for i in decision.get("injectates", []) + decision.get("cautions", []) if len(i["message"]) > 100]
    assert messages and all(any(line.strip() == m or line.strip() == "- " + m for line in lines) for m in messages)


def test_width_wraps_between_words_with_hanging_lines(mafalda: Sample) -> None:
    result = run(str(mafalda.path), "--as-of", mafalda.as_of, *mafalda.order_args, "--width", "60")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines if " " in line.strip()) <= 60
    words = result.stdout.split()
    unwrapped = run(str(mafalda.path), "--as-of", mafalda.as_of, *mafalda.order_args).stdout.split()
    assert words == unwrapped  # the same words in the same order: nothing cut inside a word
    bullet = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("- ") and i + 1 < len(lines) and lines[i + 1].startswith("  ") and len(line) > 50
    )
    assert lines[bullet + 1].startswith("  ") and not lines[bullet + 1].startswith("  -")


def test_a_terminal_gets_colour_and_its_width(mafalda: Sample) -> None:
    args = ["evaluate", str(mafalda.path), "--as-of", mafalda.as_of, *mafalda.order_args]
    result = CliRunner(env={"FORCE_COLOR": "1", "COLUMNS": "50", "NO_COLOR": None, "TTY_COMPATIBLE": None}).invoke(main, args)
    assert result.exit_code == 0, result.stderr
    assert "\x1b[" in result.stdout
    plain = [line for line in _strip_ansi(result.stdout).splitlines() if " " in line.strip()]
    assert max(map(len, plain)) <= 50


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["{malformed}"], "Bundle: not valid JSON", id="malformed-json"),
        pytest.param(["{mafalda}"], "order: no injection order", id="no-order"),
        pytest.param(["{mafalda}", "{order}", "--ruleset", "nope"], "ruleset_id: unknown rule set 'nope'",
                     id="unknown-ruleset"),
    ],
)
def test_bad_input_exits_2_with_the_grpc_message(
    grpc_server: ServerProcess, mafalda: Sample, malformed: Path, args: list[str], message: str
) -> None:
    values = {"{malformed}": [str(malformed)], "{mafalda}": [str(mafalda.path)], "{order}": mafalda.order_args}
    args = [part for arg in args for part in values.get(arg, [arg])]
    local = run(*args, "--json")
    remote = run(*args, "--json", "--server", grpc_server.target)
    for result in (local, remote):
        assert result.exit_code == 2
        assert result.stdout == ""
        assert result.stderr.startswith(f"error: {message}")
        assert "Traceback" not in result.stderr
    assert local.stderr == remote.stderr


def test_an_unknown_intent_is_a_usage_error(mafalda: Sample) -> None:
    result = run(str(mafalda.path), "--intent", "curative")
    assert result.exit_code == 2
    assert "'curative' is not one of" in result.stderr


def test_an_unreachable_server_exits_1(mafalda: Sample, unused_port: Callable[[], int]) -> None:
    result = run(str(mafalda.path), *mafalda.order_args, "--server", f"127.0.0.1:{unused_port()}", "--timeout", "2")
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.stderr


def test_the_entry_point_reads_standard_input(
    mafalda: Sample, local_json: str, malformed: Path, cli_command: list[str], cli_env: dict[str, str]
) -> None:
    command = [*cli_command, "evaluate", "-", "--as-of", mafalda.as_of, *mafalda.order_args, "--json"]
    done = subprocess.run(command, input=mafalda.bundle, capture_output=True, env=cli_env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == local_json
    done = subprocess.run(command, input=malformed.read_bytes(), capture_output=True, env=cli_env, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.decode().startswith("error: Bundle: not valid JSON")
    assert b"Traceback" not in done.stderr


# -- start-up: the rule author's commands are loaded when used ----------------------------------------


def test_needlepoint_imports_no_authoring_tool_until_one_runs() -> None:
    import sys

    probe = (
        "import sys; import needlepoint.cli; print(sorted(m for m in sys.modules if "
        "m.startswith(('needlepoint.authoring', 'needlepoint.cli_diff', 'needlepoint.cli_explain'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_rules_command_loads_by_its_name() -> None:
    import click

    from needlepoint.cli_rules import COMMANDS, rules

    ctx = click.Context(rules)
    assert rules.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        command = rules.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
    assert rules.get_command(ctx, "nosuch") is None
    help_text = CliRunner().invoke(main, ["rules", "--help"]).output
    assert all(f"  {name} " in help_text for name in COMMANDS)
