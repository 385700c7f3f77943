"""``needlepoint rules diff``: impact analysis of a rule-set change over many cases.

The main check: 1,000 seeded random patients (``tests/patients.py``), written as an NDJSON export
of past requests with FHIR Bundles, and a copy of the bundled rule set whose only change is
``inr_defer_above`` 3.0 -> 2.5. The diff must name exactly the patients whose current INR on a
vitamin K antagonist is in (2.5, 3.0] (the set is computed here from the records, not from the
engine), with DEF-INR-HIGH as the responsible rule and the deferrals as the changed field. The
same holds for a part of the corpus written as rule-set test cases (YAML).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import re
import shutil
from pathlib import Path

import orjson
import pytest
import yaml
from click.testing import CliRunner, Result

from needlepoint.authoring import diff
from needlepoint.cli import main
from needlepoint.core.record import SYSTEM_URIS, Code, InjectionOrder, Medication, Observation, PatientRecord
from needlepoint.rulesets import bundled_rulesets_dir

from .patients import AS_OF, random_patients

N_CASES = 1000
N_YAML_CASES = 200
CASES_PER_FILE = 50
FHIR_ORDER = Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json"
SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "synthea"
CDS_HOOKS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "cds-hooks"
AS_OF_TEXT = "2025-06-02T09:00:00Z"
ONLY_CHANGE = diff.Change("deferrals", "BLEEDING_RISK", None, "HARD", ("DEF-INR-HIGH",))

# What the rule set says, restated here so that the expected set does not come from the engine:
# vitamin K antagonists, the INR and platelet concepts (codes, accepted units, plausible range).
VKA_RXNORM = {"11289", "855288", "855296", "855302", "855312", "855318", "855324", "855332", "855338", "855344"}
INR = ({"6301-6", "34714-6", "46418-0", "38875-1", "52129-4"}, {"{INR}", "{ratio}", "1"}, (0.5, 20))
PLATELETS = ({"777-3", "26515-7"}, {"10*9/L", "10*3/uL", "10^3/uL", "K/uL", "10*3/mm3", "/nL"}, (0, 2000))


# -- the corpus ---------------------------------------------------------------------------------


def enrich(records: list[PatientRecord], seed: int = 3) -> list[PatientRecord]:
    """Put one patient in three on warfarin with an INR of the last nine days drawn around both
    limits (2.5 and 3.0 included), so that the band between them is well populated; a few of
    these INRs have no unit and must not count."""
    rng = random.Random(seed)
    for record in records[::3]:
        if not on_vka(record):
            record.medications.append(Medication([Code("rxnorm", "855332")]))
        value = rng.choice([2.0, 2.4, 2.5, 2.5, 2.6, 2.8, 2.9, 3.0, 3.0, 3.1, 3.5, round(rng.uniform(1.5, 4.0), 1)])
        unit = None if rng.random() < 0.05 else "{INR}"
        record.observations.append(
            Observation([Code("loinc", "6301-6")], AS_OF - dt.timedelta(days=rng.uniform(0, 9)), value=value, unit=unit)
        )
    return records


_URI = {}
for _uri, _short in SYSTEM_URIS.items():
    _URI.setdefault(_short, _uri)
_UCUM = "http://unitsofmeasure.org"
_LATERALITY = {"left": "7771000", "right": "24028007", "both": "51440002"}


def _concept(codes: list[Code]) -> dict:
    return {"coding": [{"system": _URI[c.system], "code": c.code} for c in codes]}


def _site(target: str | None, side: str | None) -> list[dict]:
    codes = ([Code("np-target", target)] if target else []) + ([Code("snomed", _LATERALITY[side])] if side else [])
    return [_concept(codes)] if codes else []


def bundle_of(record: PatientRecord) -> dict:
    """A PatientRecord as the FHIR R4 Bundle the contract describes (section 1)."""
    resources: list[dict] = [
        {
            "resourceType": "Patient",
            "id": "p",
            "gender": record.sex,
            **({"birthDate": record.birth_date.isoformat()} if record.birth_date else {}),
        }
    ]
    resources += [{"resourceType": "Condition", "code": _concept(c.codes)} for c in record.conditions]
    resources += [
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": _concept(m.codes),
        }
        for m in record.medications
    ]
    for o in record.observations:
        obs: dict = {"resourceType": "Observation", "status": "final", "code": _concept(o.codes)}
        if o.effective:
            obs["effectiveDateTime"] = o.effective.isoformat()
        if o.value_code:
            obs["valueCodeableConcept"] = _concept([o.value_code])
        else:
            obs["valueQuantity"] = {"value": o.value, **({"unit": o.unit, "system": _UCUM, "code": o.unit} if o.unit else {})}
        resources.append(obs)
    for a in record.allergies:
        resources.append(
            {
                "resourceType": "AllergyIntolerance",
                "code": _concept(a.codes),
                **({"reaction": [{"severity": a.severity}]} if a.severity else {}),
            }
        )
    for i in record.prior_injections:
        resources.append({"resourceType": "Procedure", "status": "completed", "code": _concept(i.codes),
                          "performedDateTime": i.performed.isoformat(), "bodySite": _site(i.target, i.side),
                          "usedCode": [_concept([a]) for a in i.agents]})  # fmt: skip
    for s in record.planned_surgeries:
        resources.append({"resourceType": "ServiceRequest", "status": "active", "intent": "order", "code": _concept(s.codes),
                          "occurrenceDateTime": s.date.isoformat(), "bodySite": _site(None, s.side)})  # fmt: skip
    o = record.order
    details = [_concept([Code("np-intent", o.intent)])] if o.intent else []
    details += [_concept([Code("np-flag", f)]) for f in record.flags]
    resources.append({"resourceType": "ServiceRequest", "status": "draft", "intent": "order", "orderDetail": details,
                      "bodySite": _site(o.target, o.side), "reasonCode": [_concept([r]) for r in o.reasons],
                      **({"code": _concept(o.codes)} if o.codes else {})})  # fmt: skip
    resources += [
        {
            "resourceType": "MedicationRequest",
            "status": "draft",
            "intent": "order",
            "medicationCodeableConcept": _concept(i.codes),
        }
        for i in record.planned_injectates
    ]
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def write_export(path: Path, records: list[PatientRecord]) -> None:
    """The records as an NDJSON export of past requests, one FHIR Bundle a line."""
    with path.open("wb") as fh:
        for i, record in enumerate(records):
            fh.write(
                orjson.dumps({"correlationId": f"patient-{i:05d}", "asOf": AS_OF_TEXT, "fhirBundle": bundle_of(record)}) + b"\n"
            )


def _iso(value: dt.datetime | dt.date) -> str:
    return value.isoformat()


def _codes(codes: list[Code]) -> list[str]:
    return [f"{c.system}#{c.code}" for c in codes]


def shorthand(record: PatientRecord) -> dict:
    """A PatientRecord in the test-case shorthand of needlepoint.casefile (absolute instants)."""
    p: dict = {"sex": record.sex}
    if record.birth_date:
        p["birth_date"] = _iso(record.birth_date)
    p["conditions"] = [{"codes": _codes(c.codes)} for c in record.conditions]
    p["medications"] = [{"codes": _codes(m.codes)} for m in record.medications]
    p["observations"] = []
    for o in record.observations:
        item: dict = {"codes": _codes(o.codes)}
        for key, value in (("value", o.value), ("unit", o.unit), ("at", o.effective and _iso(o.effective))):
            if value is not None:
                item[key] = value
        if o.value_code:
            item["value_code"] = f"{o.value_code.system}#{o.value_code.code}"
        p["observations"].append(item)
    p["allergies"] = [{"codes": _codes(a.codes), **({"severity": a.severity} if a.severity else {})} for a in record.allergies]
    p["prior_injections"] = [
        {"codes": _codes(i.codes), "at": _iso(i.performed), "agents": _codes(i.agents),
         **{k: v for k, v in (("target", i.target), ("side", i.side)) if v}}
        for i in record.prior_injections
    ]  # fmt: skip
    p["planned_surgeries"] = [
        {"codes": _codes(s.codes), "at": _iso(s.date), **({"side": s.side} if s.side else {})} for s in record.planned_surgeries
    ]
    o = record.order
    p["order"] = {k: v for k, v in (("target", o.target), ("side", o.side), ("intent", o.intent)) if v}
    p["order"] |= {"codes": _codes(o.codes), "reasons": _codes(o.reasons)}
    p["injectates"] = [c for inj in record.planned_injectates for c in _codes(inj.codes)]
    p["flags"] = list(record.flags)
    return p


def write_cases(directory: Path, records: list[PatientRecord], per_file: int = CASES_PER_FILE) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(records), per_file):
        cases = [
            {"name": f"patient-{i:05d}", "as_of": AS_OF_TEXT, "patient": shorthand(records[i]), "expect": {}}
            for i in range(start, min(start + per_file, len(records)))
        ]
        text = yaml.dump(cases, Dumper=yaml.CSafeDumper, sort_keys=False, default_flow_style=None, width=200)
        (directory / f"generated-{start // per_file:03d}.yaml").write_text(text)


def newest_usable(record: PatientRecord, concept: tuple) -> tuple[float, float] | None:
    """(value, age in days) of the newest dated result of a concept, if its value can be used."""
    codes, units, (low, high) = concept
    dated = [
        o
        for o in record.observations
        if o.effective is not None and any(c.system == "loinc" and c.code in codes for c in o.codes)
    ]
    dated = [o for o in dated if o.effective <= AS_OF + dt.timedelta(minutes=10)]
    if not dated:
        return None
    newest = max(dated, key=lambda o: o.effective)
    if newest.value is None or newest.unit not in units or not low <= newest.value <= high:
        return None
    return newest.value, round((AS_OF - newest.effective).total_seconds() / 86400, 4)


def on_vka(record: PatientRecord) -> bool:
    return any(
        (c.system == "rxnorm" and c.code in VKA_RXNORM) or (c.system == "atc" and c.code.startswith("B01AA"))
        for m in record.medications
        for c in m.codes
    )


def inr_between(record: PatientRecord, low: float, high: float) -> bool:
    """On a vitamin K antagonist with a current INR (at most 7 days old) in (low, high]."""
    inr = newest_usable(record, INR)
    return on_vka(record) and inr is not None and inr[1] <= 7 and low < inr[0] <= high


def platelets_below(record: PatientRecord, limit: float) -> bool:
    """A current platelet count (at most 30 days old) below the limit: already a HARD
    BLEEDING_RISK deferral, so an INR deferral changes nothing in such a decision."""
    plt = newest_usable(record, PLATELETS)
    return plt is not None and plt[1] <= 30 and plt[0] < limit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PatientRecord]]:
    """1,000 patients as an NDJSON export of requests with FHIR Bundles."""
    records = enrich(random_patients(N_CASES, seed=20261122))
    directory = tmp_path_factory.mktemp("corpus")
    write_export(directory / "requests.ndjson", records)
    return directory, records


@pytest.fixture(scope="module")
def yaml_corpus(tmp_path_factory: pytest.TempPathFactory, corpus) -> Path:
    """The first 200 of the same patients as rule-set test cases."""
    directory = tmp_path_factory.mktemp("yaml-corpus")
    write_cases(directory, corpus[1][:N_YAML_CASES])
    return directory


@pytest.fixture(scope="module")
def expected(corpus) -> dict[str, set[str]]:
    _, records = corpus
    band = {f"patient-{i:05d}" for i, r in enumerate(records) if inr_between(r, 2.5, 3.0)}
    masked = {f"patient-{i:05d}" for i, r in enumerate(records) if platelets_below(r, 20)}
    return {"fires": band, "changed": band - masked}


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled rule set, a copy with inr_defer_above 2.5, and a site overlay that says the same."""
    root = tmp_path_factory.mktemp("versions")
    base, strict = root / "base", root / "strict"
    shutil.copytree(bundled_rulesets_dir() / "hip-injection", base)
    shutil.copytree(base, strict)
    params = strict / "parameters.yaml"
    text, n = re.subn(r"(?m)^(inr_defer_above:\n  value: )3\.0$", r"\g<1>2.5", params.read_text())
    assert n == 1
    params.write_text(text)
    overlay = root / "north.yaml"
    overlay.write_text("site: north\nparameters:\n  inr_defer_above: 2.5\n")
    return {"base": base, "strict": strict, "overlay": overlay}


@pytest.fixture(scope="module")
def threshold_report(corpus, versions) -> diff.DiffReport:
    directory, _ = corpus
    report = diff.run_diff(diff.Version(versions["base"]), diff.Version(versions["strict"]), directory, jobs=2)
    print(f"\nrules diff: {report.total} cases in {report.seconds:.2f} s on {report.jobs} processes")
    return report


def names(outcomes: list[diff.CaseOutcome]) -> set[str]:
    return {o.name for o in outcomes}


# -- one threshold, 1,000 cases --------------------------------------------------------------------


@pytest.mark.slow  # the 1,000-case corpus
def test_one_threshold_names_exactly_the_changed_decisions(threshold_report: diff.DiffReport, expected) -> None:
    report = threshold_report
    assert report.total == N_CASES and report.jobs == 2
    assert not report.of("error") and not report.skipped
    assert len(expected["changed"]) >= 10, "the corpus should exercise the band"
    assert names(report.changed) == expected["changed"]
    for outcome in report.changed:
        assert outcome.changes == [ONLY_CHANGE], outcome.case
        assert [(f.rule, f.how) for f in outcome.firings] == [("DEF-INR-HIGH", "new only")]
        assert any(m.endswith("{INR}") and ".value = " in m for m in outcome.firings[0].new)
    # DEF-INR-HIGH fires newly for every patient in the band; where platelets already defer for
    # bleeding risk, the decision stays the same and the case is listed as a firing difference.
    assert names(report.of("firings")) == expected["fires"] - expected["changed"]
    assert report.field_counts() == {"deferrals": len(expected["changed"])}
    assert report.transitions() == [("deferrals", "BLEEDING_RISK", None, "HARD", len(expected["changed"]))]
    [rule] = report.by_rule()
    assert (rule.rule, rule.decisions_changed, rule.fired_differently) == (
        "DEF-INR-HIGH",
        len(expected["changed"]),
        len(expected["fires"]),
    )
    assert dict(rule.fields) == {"deferrals": len(expected["changed"])}
    assert report.exit_code == diff.EXIT_CHANGED


@pytest.mark.slow  # the 1,000-case corpus
def test_the_rule_set_change_is_named(threshold_report: diff.DiffReport) -> None:
    changes = threshold_report.changes
    assert [(p.name, p.old, p.new) for p in changes.parameters] == [("inr_defer_above", 3.0, 2.5)]
    assert not (changes.rules_added or changes.rules_removed or changes.rules_modified or changes.value_sets)
    assert "DEF-INR-HIGH" in changes.affected and "DATA-INR-CURRENT" not in changes.affected


@pytest.mark.slow  # the 1,000-case corpus
def test_identical_versions_change_nothing(corpus, versions) -> None:
    directory, _ = corpus
    report = diff.run_diff(
        diff.Version(versions["base"]), diff.Version(bundled_rulesets_dir() / "hip-injection"), directory, jobs=2
    )
    assert report.total == N_CASES and report.same == N_CASES
    assert report.outcomes == [] and report.changes.empty
    assert report.old.digest == report.new.digest
    assert report.exit_code == diff.EXIT_SAME
    assert "The two versions are identical" in diff.render_markdown(report)


@pytest.mark.slow  # the 1,000-case corpus
def test_an_overlay_against_its_base_through_the_cli(corpus, versions, expected) -> None:
    directory, _ = corpus
    result = run("hip-injection", f"{versions['base']}:{versions['overlay']}", "--cases", str(directory), "--format", "json")
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert {c["name"] for c in report["changed"]} == expected["changed"]
    assert {
        (c["field"], c["item"], c["old"], c["new"], tuple(c["rules"])) for case in report["changed"] for c in case["changes"]
    } == {("deferrals", "BLEEDING_RISK", None, "HARD", ("DEF-INR-HIGH",))}
    [param] = report["rulesetChanges"]["parameters"]
    assert param == {"name": "inr_defer_above", "old": 3.0, "new": 2.5, "oldLayer": "hip-injection", "newLayer": "north"}
    assert report["new"]["layers"] == ["hip-injection", "north"]
    assert report["summary"]["cases"] == N_CASES


@pytest.mark.slow  # the 1,000-case corpus
def test_the_same_through_rule_set_test_cases(yaml_corpus: Path, versions, expected) -> None:
    report = diff.run_diff(diff.Version(versions["base"]), diff.Version(versions["strict"]), yaml_corpus, jobs=2)
    first = {f"patient-{i:05d}" for i in range(N_YAML_CASES)}
    assert report.total == N_YAML_CASES and not report.of("error")
    assert names(report.changed) == expected["changed"] & first
    assert all(o.changes == [ONLY_CHANGE] and re.fullmatch(r"generated-\d{3}\.yaml\[\d+\]", o.case) for o in report.changed)
    assert {o.as_of for o in report.changed} == {AS_OF_TEXT}


@pytest.mark.slow  # the 1,000-case corpus
def test_the_overlay_option_is_the_same_as_the_colon_form(yaml_corpus: Path, versions) -> None:
    one_file = sorted(yaml_corpus.glob("*.yaml"))[0]
    colon = run(
        str(versions["base"]),
        f"{versions['base']}:{versions['overlay']}",
        "--cases",
        str(one_file),
        "--format",
        "json",
        "-j",
        "1",
    )
    option = run(
        str(versions["base"]),
        str(versions["base"]),
        "--new-overlay",
        str(versions["overlay"]),
        "--cases",
        str(one_file),
        "--format",
        "json",
        "-j",
        "1",
    )
    assert colon.exit_code == option.exit_code
    strip = lambda r: {k: v for k, v in json.loads(r.stdout).items() if k not in ("timing", "defaultAsOf", "new", "old")}  # noqa: E731
    assert strip(colon) == strip(option)


# -- renderings ------------------------------------------------------------------------------------


@pytest.mark.slow  # the 1,000-case corpus
def test_markdown_html_and_json_name_the_changed_cases(threshold_report: diff.DiffReport, expected) -> None:
    markdown = diff.render_markdown(threshold_report)
    page = diff.render_html(threshold_report)
    data = diff.to_json(threshold_report)
    for name in expected["changed"]:
        assert name in markdown and name in page
    assert {c["name"] for c in data["changed"]} == expected["changed"]
    assert data["summary"]["changed"] == len(expected["changed"])
    assert "| `DEF-INR-HIGH` |" in markdown and "| deferrals | BLEEDING\\_RISK | — | HARD |" in markdown
    assert "<code>DEF-INR-HIGH</code>" in page and '<td class="new">HARD</td>' in page
    orjson.dumps(data)  # serialisable as it stands
    # one self-contained page: inline style, no script, nothing fetched
    assert page.startswith("<!doctype html>") and "<style>" in page
    assert "<script" not in page and " src=" not in page and " href=" not in page


@pytest.mark.slow  # the 1,000-case corpus
def test_max_cases_shortens_the_listing_not_the_counts(threshold_report: diff.DiffReport, expected) -> None:
    markdown = diff.render_markdown(threshold_report, max_cases=3)
    assert markdown.count("\n### ") == 3
    assert f"## Changed decisions ({len(expected['changed'])})" in markdown
    assert f"and {len(expected['changed']) - 3} more changed decisions" in markdown


# -- inputs of every kind ----------------------------------------------------------------------------


def _warfarin_record() -> PatientRecord:
    return PatientRecord(
        birth_date=dt.date(1958, 3, 1),
        sex="female",
        medications=[Medication([Code("rxnorm", "855332")])],
        observations=[Observation([Code("loinc", "6301-6")], AS_OF - dt.timedelta(days=1), value=2.8, unit="{INR}")],
        order=InjectionOrder("hip-intra-articular", "right", "therapeutic"),
    )


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with every accepted input kind, bad inputs and files to skip."""
    from google.protobuf import json_format

    from needlepoint import intake

    root = tmp_path_factory.mktemp("mixed")
    bundle = json.loads(FHIR_ORDER.read_text())
    for entry in bundle["entry"]:
        if entry["resource"].get("id") == "inr":
            entry["resource"]["valueQuantity"]["value"] = 2.8
    inr_28 = json.dumps(bundle)
    (root / "bundles").mkdir()
    (root / "bundles" / "order-inr-2.8.json").write_text(inr_28)
    shutil.copy(SYNTHEA / "Mafalda_Turcotte_80833fb2-95c1-4f5b-ab5e-26230287ee61.json", root / "bundles" / "mafalda.json")
    shutil.copy(CDS_HOOKS / "pama-scenario-01-outbound-request.json", root / "bundles" / "cds-hooks-request.json")
    context = json_format.MessageToDict(intake.context_from_record(_warfarin_record()))
    lines = [
        json.dumps({"correlationId": "req-object", "asOf": AS_OF_TEXT, "fhirBundle": bundle}),
        FHIR_ORDER.read_text().replace("\n", ""),  # a bare bundle, INR 2.4: no change
        "",
        "this is not JSON",
        json.dumps({"foo": 1}),
        json.dumps({"correlationId": "req-base64", "asOf": AS_OF_TEXT, "fhirBundle": base64.b64encode(inr_28.encode()).decode()}),
        json.dumps({"correlationId": "req-context", "asOf": AS_OF_TEXT, "context": context}),
        json.dumps({"correlationId": "req-bad-asof", "asOf": "yesterday", "fhirBundle": bundle}),
    ]
    (root / "export.ndjson").write_text("\n".join(lines) + "\n")
    cases = [
        {"name": "warfarin, INR 2.8 <b>bold</b> | piped", "as_of": AS_OF_TEXT, "expect": {},
         "patient": {"age": 70, "sex": "male", "medications": ["rxnorm#855332"],
                     "observations": [{"code": "loinc#6301-6", "value": 2.8, "unit": "{INR}", "days_before": 1}],
                     "order": {"target": "hip-intra-articular", "side": "left", "intent": "therapeutic"}}},
        {"name": "no anticoagulant", "as_of": AS_OF_TEXT, "expect": {},
         "patient": {"age": 50, "sex": "female",
                     "order": {"target": "hip-intra-articular", "side": "left", "intent": "therapeutic"}}},
    ]  # fmt: skip
    (root / "cases.yaml").write_text(yaml.safe_dump(cases, sort_keys=False))
    (root / "bad-case.yaml").write_text(
        yaml.safe_dump([{"name": "bad code", "expect": {}, "patient": {"medications": ["855332"]}}])
    )
    (root / "settings.yaml").write_text("colour: blue\n")
    (root / "broken.yaml").write_text("- name: [unclosed\n")
    (root / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    (root / "latin1.yaml").write_bytes(b"- name: caf\xe9\n")
    (root / "response.json").write_text('{"cards": []}')
    (root / "notes.txt").write_text("not an input")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "ignored.json").write_text("{")
    return root


def _mixed_report(mixed: Path, versions, **kwargs) -> diff.DiffReport:
    return diff.run_diff(diff.Version(versions["base"]), diff.Version(versions["strict"]), mixed, **kwargs)


def test_every_input_kind_is_read_and_bad_ones_are_reported(mixed: Path, versions) -> None:
    report = _mixed_report(mixed, versions, jobs=1)
    changed = {(o.case, o.name) for o in report.changed}
    # bundles/order-inr-2.8.json carries no instant: at the start of the run its INR is too old
    # to count under either version, so only inputs evaluated in June 2025 change.
    assert changed == {
        ("cases.yaml[0]", "warfarin, INR 2.8 <b>bold</b> | piped"),
        ("export.ndjson:1", "req-object"),
        ("export.ndjson:6", "req-base64"),
        ("export.ndjson:7", "req-context"),
    }
    assert all(o.changes == [ONLY_CHANGE] for o in report.changed)
    errors = {o.case: o.old_error for o in report.of("error")}
    assert set(errors) == {
        "bad-case.yaml", "bundles/cds-hooks-request.json", "bundles/mafalda.json",
        "export.ndjson:4", "export.ndjson:5", "export.ndjson:8",
    }  # fmt: skip
    assert all(o.old_error == o.new_error for o in report.of("error"))
    assert "medications[0].code" in errors["bad-case.yaml"]
    assert errors["bundles/mafalda.json"].startswith("order: no injection order")
    assert errors["bundles/cds-hooks-request.json"].startswith("order.target: ")  # an MRI order, no injection
    assert "not valid JSON" in errors["export.ndjson:4"]
    assert "asOf" in errors["export.ndjson:8"] or "request" in errors["export.ndjson:8"]
    skipped = dict(report.skipped)
    assert set(skipped) == {"broken.json", "broken.yaml", "latin1.yaml", "notes.txt", "response.json", "settings.yaml"}
    assert skipped["notes.txt"].startswith("not an input format")
    assert skipped["broken.json"].startswith("not valid JSON")
    assert skipped["broken.yaml"].startswith("not valid YAML")
    assert skipped["latin1.yaml"].startswith("cannot be read")
    assert skipped["settings.yaml"].startswith("not a file of rule-set test cases")
    assert skipped["response.json"].startswith("not a FHIR Bundle")
    # the bare bundle, the JSON file and the healthy case were evaluated and did not change
    assert report.total == len(report.outcomes) + report.same and report.same >= 3
    assert report.exit_code == diff.EXIT_CHANGED
    markdown = diff.render_markdown(report)
    assert "## Skipped files (6)" in markdown and "notes.txt: not an input format" in markdown
    assert "## Errors (6)" in markdown


def test_order_defaults_supply_a_missing_order(mixed: Path, versions) -> None:
    report = _mixed_report(mixed, versions, jobs=1, order=("hip-intra-articular", "right", "therapeutic"))
    errors = {o.case for o in report.of("error")}
    assert "bundles/mafalda.json" not in errors and "bundles/cds-hooks-request.json" not in errors


def test_as_of_puts_every_case_at_one_instant(mixed: Path, versions) -> None:
    report = _mixed_report(mixed, versions, jobs=1, as_of=dt.datetime(2025, 6, 2, 9, tzinfo=dt.timezone.utc))
    # the bare bundle and the JSON file (INR 2.8 three days before) now have a current INR
    assert "bundles/order-inr-2.8.json" in {o.case for o in report.changed}
    assert {o.as_of for o in report.outcomes if o.as_of} == {AS_OF_TEXT}


@pytest.mark.slow  # worker processes
def test_workers_give_the_same_report_as_one_process(mixed: Path, versions, monkeypatch: pytest.MonkeyPatch) -> None:
    alone = _mixed_report(mixed, versions, jobs=1, as_of=AS_OF)
    monkeypatch.setattr(diff.run, "IN_PROCESS_BYTES", 0)
    pooled = _mixed_report(mixed, versions, jobs=2, as_of=AS_OF)
    assert pooled.jobs == 2
    strip = lambda r: {k: v for k, v in diff.to_json(r).items() if k not in ("timing", "defaultAsOf")}  # noqa: E731
    assert strip(alone) == strip(pooled)


def test_html_and_markdown_escape_what_they_quote(mixed: Path, versions) -> None:
    report = _mixed_report(mixed, versions, jobs=1)
    page = diff.render_html(report)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt; | piped" in page
    markdown = diff.render_markdown(report)
    assert "\\<b\\>bold\\</b\\> \\| piped" in markdown


# -- the command ---------------------------------------------------------------------------------------


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["rules", "diff", *args])


def test_exit_codes(mixed: Path, versions, tmp_path: Path) -> None:
    one_case = tmp_path / "one.yaml"
    one_case.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "plain",
                    "expect": {},
                    "patient": {"age": 40, "order": {"target": "hip-intra-articular", "side": "left", "intent": "therapeutic"}},
                }
            ]
        )
    )
    assert run(str(versions["base"]), "hip-injection", "--cases", str(one_case)).exit_code == 0
    assert run(str(versions["base"]), str(versions["strict"]), "--cases", str(mixed)).exit_code == 1
    bad_overlay = tmp_path / "bad.yaml"
    bad_overlay.write_text("site: x\nparameters: {no_such_parameter: 1}\n")
    result = run("hip-injection", f"hip-injection:{bad_overlay}", "--cases", str(one_case))
    assert result.exit_code == 2 and "does not load" in result.stderr
    for args in (
        ["no/such/dir", "hip-injection", "--cases", str(one_case)],
        ["hip-injection", "hip-injection", "--cases", str(tmp_path / "absent")],
        ["hip-injection", f"hip-injection:{bad_overlay}", "--new-overlay", str(bad_overlay), "--cases", str(one_case)],
        ["hip-injection", "hip-injection:absent.yaml", "--cases", str(one_case)],
        ["hip-injection", "hip-injection", "--cases", str(one_case), "--as-of", "soon"],
        ["hip-injection", "hip-injection", "--cases", str(one_case), "--format", "pdf"],
    ):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)


def test_output_file_and_progress_stay_off_standard_output(mixed: Path, versions, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = run(str(versions["base"]), str(versions["strict"]), "--cases", str(mixed), "--format", "html", "--output", str(out))
    assert result.exit_code == 1 and result.stdout == ""
    assert "decisions changed" in result.stderr
    assert out.read_text().startswith("<!doctype html>")
    result = run(
        str(versions["base"]), str(versions["strict"]), "--cases", str(mixed), "--format", "json", "--progress", "-j", "1"
    )
    assert json.loads(result.stdout)["summary"]["changed"] == 4


def test_help_documents_the_inputs() -> None:
    text = CliRunner().invoke(main, ["rules", "diff", "--help"]).output
    for needle in (
        "DIR:OVERLAY.yaml",
        "*.ndjson",
        "correlationId",
        "fhirBundle",
        "CDS Hooks",
        "rule-set test cases",
        "Exit code",
    ):
        assert needle in text
