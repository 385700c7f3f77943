"""views.coordinator: the coordinator's view of a decision, from the decision dict alone."""

from __future__ import annotations

import datetime as dt
import re

from needlepoint.core.record import Code, InjectionOrder, Medication, Observation, PatientRecord
from needlepoint.views.coordinator import (
    GO_AHEAD,
    GO_AHEAD_WITHOUT_SOME,
    NOT_NOW,
    REVIEW_FIRST,
    Line,
    coordinator_view,
    render,
    wrap,
)

from .patients import AS_OF, random_patients

ORDER = InjectionOrder("hip-intra-articular", "right", "therapeutic")
WARFARIN = Medication([Code("rxnorm", "855332", "Warfarin Sodium 5 MG Oral Tablet")])


def text_of(decision: dict) -> str:
    return render(decision)


def test_each_fact_is_said_once(hip_evaluator) -> None:
    decision = hip_evaluator.evaluate(PatientRecord(birth_date=dt.date(1950, 1, 1), medications=[WARFARIN], order=ORDER), AS_OF)
    message = next(d["message"] for d in decision["deferrals"] if d["reason"] == "PENDING_DATA")
    assert any(m["message"] == message for m in decision["missingData"])  # the decision holds it twice
    text = text_of(decision)
    assert text.count(message) == 1
    assert "Warfarin Sodium 5 MG Oral Tablet" in text and "no earlier than 26 May 2025" in text


def test_a_merged_message_is_not_repeated_piece_by_piece() -> None:
    decision = {
        "asOf": "2025-06-02T09:00:00Z",
        "injectates": [
            {
                "category": "CORTICOSTEROID",
                "recommendation": "CAUTION",
                "ruleIds": ["A", "B"],
                "message": "First advice. Second advice.",
            }
        ],
        "cautions": [
            {"code": "X", "ruleIds": ["A"], "message": "First advice."},
            {"code": "Y", "ruleIds": ["B"], "message": "Second advice."},
        ],
    }
    text = text_of(decision)
    assert text.count("First advice.") == 1 and text.count("Second advice.") == 1
    assert "Before and during" not in text  # nothing new to say there


def test_the_verdict_follows_severity_and_scope() -> None:
    def status(*deferrals: tuple[str, str]) -> str:
        return coordinator_view(
            {
                "deferrals": [
                    {"reason": "BLEEDING_RISK", "severity": sev, "scope": scope, "message": "m"} for sev, scope in deferrals
                ]
            }
        ).status

    assert status(("HARD", "PROCEDURE"), ("SOFT", "PROCEDURE")) == NOT_NOW
    assert status(("SOFT", "PROCEDURE"), ("HARD", "CORTICOSTEROID")) == REVIEW_FIRST
    assert status(("HARD", "CORTICOSTEROID")) == GO_AHEAD_WITHOUT_SOME
    assert status() == GO_AHEAD


def test_no_ids_codes_or_raw_units_in_the_text(hip_evaluator) -> None:
    raw = re.compile(r"\{|\}|#|10\*\d|\[degF\]|\bCel\b|\b[A-Z]+-[A-Z0-9]+(?:-[A-Z0-9]+)+\b|\b[A-Z]+_[A-Z_]+\b|\w+-\w+:\w+")
    for record in random_patients(150, seed=9):
        decision = hip_evaluator.evaluate(record, AS_OF)
        body = text_of(decision).rsplit("\nReference ", 1)[0]
        assert not raw.search(body), (raw.search(body).group(0), body)


def test_a_deceased_patient_reads_as_such(hip_evaluator) -> None:
    record = PatientRecord(
        birth_date=dt.date(1940, 1, 1),
        deceased=True,
        deceased_at=AS_OF - dt.timedelta(days=30),
        medications=[WARFARIN],
        order=ORDER,
    )
    view = coordinator_view(hip_evaluator.evaluate(record, AS_OF))
    assert view.status == NOT_NOW and "has died" in view.verdict
    assert [s.title for s in view.sections] == ["Reasons to wait"]


def test_the_image_guidance_says_why(hip_evaluator) -> None:
    child = PatientRecord(birth_date=dt.date(2015, 1, 1), sex="female", order=ORDER)
    text = text_of(hip_evaluator.evaluate(child, AS_OF))
    assert "- Use ultrasound; avoid fluoroscopy (X-ray)" in text and "Because: child, ultrasound and avoid fluoroscopy" in text
    assert "- Iodinated contrast (X-ray dye): not suggested." in text


def test_wrap_keeps_words_whole_and_hangs_continuations() -> None:
    line = Line(
        "A platelet count of 25 ×10⁹/L taken 30 May 2025 is below the limit of 50 ×10⁹/L; decide individually.", bullet="- "
    )
    assert wrap(line, None) == ["- " + line.text]
    wrapped = wrap(line, 30)
    assert all(len(w) <= 30 for w in wrapped) and all(w.startswith("  ") for w in wrapped[1:])
    assert " ".join(w.strip().removeprefix("- ") for w in wrapped).split() == line.text.split()


def test_values_in_the_text_carry_human_units(hip_evaluator) -> None:
    egfr = Observation([Code("loinc", "33914-3")], AS_OF - dt.timedelta(days=20), value=22, unit="mL/min/{1.73_m2}")
    text = text_of(hip_evaluator.evaluate(PatientRecord(birth_date=dt.date(1950, 1, 1), observations=[egfr], order=ORDER), AS_OF))
    assert "The eGFR is 22 mL/min/1.73 m² (taken 13 May 2025, 2 weeks ago), below 30 mL/min/1.73 m²" in text
