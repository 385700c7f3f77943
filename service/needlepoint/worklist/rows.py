"""A batch result row as a worklist row: a plain status, what to do in words, and why.

**Plain status.** Each decision (the one as of the run's instant and, when there is a planned
date, the one on that date) is read on its own, and the row takes the more serious of the two,
so that a referral which is fine today but not on the day it is booked for says so:

==========================  ==================================================================
status                      when
==========================  ==================================================================
``cannot evaluate``         the batch row is an ``error`` (a malformed file, line or CSV row)
``deferred``                a HARD deferral of the whole procedure other than missing data;
                            a deceased patient too, with words of its own
``needs clinician review``  only SOFT deferrals of the procedure (batch status ``review``)
``needs data``              a HARD ``PENDING_DATA`` deferral (a result or detail is missing),
                            or a result to repeat before the planned date (``to-repeat``)
``ready``                   nothing holds the procedure (batch status ``go-ahead``)
==========================  ==================================================================

Seriousness, from most to least: cannot evaluate, deferred, needs clinician review, needs data,
ready. A deferral that concerns one medicine (scope = an injectate) never changes the status;
the "what to do" line names the medicine to hold back.

**What to do** is a short list of sentences built from the coordinator view's words
(:mod:`needlepoint.views.coordinator`: the reason names, the guidance headline, the rule
messages) and from ``toRepeat``: ``INR needed, taken on or after 13 June 2025 and by 20 June
2025 (the result of 30 May 2025 will be too old on the planned date).`` The dates are the
calendar days of ``repeatFrom`` and ``repeatBy``; ``repeatFrom`` is the planned day's last second
minus the rule's window, so its day is the one the rule set's own messages name ("an INR taken
no earlier than 13 June"); a result from early that day is within the window for an injection
given before the same time of day on the planned date.

**Reasons** name the plain reason, then each rule's title and id, e.g. ``Bleeding risk: INR above
the procedural limit on a vitamin K antagonist (DEF-INR-HIGH)``; a reason that only holds on the
planned date says so.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from needlepoint.views.coordinator import INJECTATES, REASONS, coordinator_view, words

READY, NEEDS_DATA, DEFERRED, REVIEW, CANNOT = "ready", "needs data", "deferred", "needs clinician review", "cannot evaluate"
STATUSES = (CANNOT, DEFERRED, REVIEW, NEEDS_DATA, READY)  # most serious first
SERIOUSNESS = {status: rank for rank, status in enumerate(STATUSES)}
DESCRIPTIONS = {
    READY: "Nothing in the record holds the injection: it can be booked.",
    NEEDS_DATA: "A result or detail is missing, or will be too old on the planned date: obtain it first.",
    DEFERRED: "The injection has to wait: act on the reasons, then have the referral checked again.",
    REVIEW: "A clinician has to look at the reasons before the injection is booked.",
    CANNOT: "The referral could not be evaluated: fix the file or row named, then run the worklist again.",
}
DECEASED = "PATIENT_DECEASED"
PENDING = "PENDING_DATA"


@dataclass(frozen=True)
class Reason:
    """One reason a referral is held: plain words, how firmly, and the rules behind it."""

    words: str
    severity: str  # HARD | SOFT | DATA (a result to repeat)
    rules: tuple[tuple[str, str], ...]  # (rule id, title)
    planned_only: bool = False

    def text(self) -> str:
        """``Bleeding risk: <title> (ID); <title> (ID)``, marked when it holds on the planned date only."""
        rules = "; ".join(f"{title} ({rid})" if title != rid else rid for rid, title in self.rules)
        when = " (on the planned date)" if self.planned_only else ""
        return f"{self.words}{when}: {rules}" if rules else f"{self.words}{when}"


@dataclass(frozen=True)
class WorklistRow:
    """One referral on the worklist. ``decision_id`` links to the explanation page of the decision
    the status comes from (the planned-date one when that is the more serious)."""

    referral_id: str
    patient_id: str | None
    patient_name: str | None
    source: str
    status: str
    what_to_do: tuple[str, ...]
    reasons: tuple[Reason, ...]
    as_of: str | None
    planned_date: str | None
    decision_id: str | None
    batch_status: str
    error: str | None = None
    decisions: dict[str, dict] = field(default_factory=dict, compare=False, repr=False)  # decisionId -> decision

    @property
    def what_to_do_text(self) -> str:
        return " ".join(self.what_to_do)

    @property
    def reasons_text(self) -> str:
        return " | ".join(r.text() for r in self.reasons)

    @property
    def reason_words(self) -> tuple[str, ...]:
        """The distinct plain reasons, for filtering."""
        return tuple(dict.fromkeys(r.words for r in self.reasons))

    @property
    def planned_week(self) -> str:
        """The ISO week of the planned date (``2025-W25``), or empty."""
        day = _date(self.planned_date)
        if day is None:
            return ""
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"


# -- dates in words -----------------------------------------------------------------------------------


def _date(text: str | None) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.timezone.utc).date()
    except ValueError:
        return None


def day_words(text: str | None) -> str:
    """``2025-06-13T23:59:59Z`` as ``13 June 2025`` (the text itself if it is not a date)."""
    day = _date(text)
    return f"{day.day} {day:%B} {day.year}" if day else (text or "")


# -- the status of one decision ------------------------------------------------------------------------


def decision_status(decision: dict[str, Any]) -> str:
    """The plain status of one decision, by the table in the module's docstring."""
    whole = [d for d in decision.get("deferrals", ()) if d.get("scope", "PROCEDURE") == "PROCEDURE"]
    hard = [d for d in whole if d.get("severity") == "HARD"]
    if any(d.get("reason") != PENDING for d in hard):
        return DEFERRED
    if hard:
        return NEEDS_DATA
    return REVIEW if whole else READY


def _titles(*decisions: dict | None) -> dict[str, str]:
    titles: dict[str, str] = {}
    for decision in decisions:
        for x in (decision or {}).get("explanations", ()):
            if x.get("ruleId") and x.get("title"):
                titles.setdefault(x["ruleId"], x["title"])
    return titles


def _reasons(decision: dict, titles: dict[str, str], planned_only: bool, skip: set[tuple[str, str]]) -> list[Reason]:
    """The procedure and medicine deferrals of a decision as reasons, except those in ``skip``
    (``(reason, scope)`` pairs already listed from the other decision)."""
    out = []
    for d in decision.get("deferrals", ()):
        key = (d.get("reason", ""), d.get("scope", "PROCEDURE"))
        if key in skip:
            continue
        name = words(REASONS, key[0])
        if key[1] != "PROCEDURE":
            name = f"{name} ({words(INJECTATES, key[1]).lower()} only)"
        rules = tuple((rid, titles.get(rid, rid)) for rid in d.get("ruleIds", ()))
        out.append(Reason(name, d.get("severity", ""), rules, planned_only))
    return out


def _deferral_sentence(d: dict) -> str:
    """What to do about one deferral, in the coordinator view's words plus its rule's message."""
    reason, scope, hard = d.get("reason", ""), d.get("scope", "PROCEDURE"), d.get("severity") == "HARD"
    message = (d.get("message") or "").strip()
    if scope != "PROCEDURE":
        medicine = words(INJECTATES, scope).lower()
        lead = f"Hold back {medicine}" if hard else f"Give {medicine} only after a clinician's review"
        return f"{lead}: {message}" if message else f"{lead}."
    if reason == PENDING:
        return message or "Obtain the missing result or detail before the injection."
    lead = f"{words(REASONS, reason)}: not now" if hard else f"Ask a clinician to review ({words(REASONS, reason).lower()})"
    return f"{lead}. {message}" if message else f"{lead}."


def _repeat_sentence(item: dict, planned_date: str | None) -> str:
    """``INR needed, taken on or after 13 June 2025 and by 20 June 2025 (…)``."""
    title = item.get("title") or item.get("concept", "A result")
    when = f"taken on or after {day_words(item.get('repeatFrom'))} and by {day_words(item.get('repeatBy'))}"
    why = f"the result of {day_words(item.get('resultAt'))} will be too old on the planned date, {day_words(planned_date)}"
    return f"{title} needed, {when} ({why})."


def _ready_sentence(decision: dict) -> str:
    """``Can go ahead. Use fluoroscopy (X-ray); ultrasound is also acceptable.``"""
    view = coordinator_view(decision)
    guidance = next((s.items[0].headline for s in view.sections if s.title == "Image guidance" and s.items), "")
    return f"Can go ahead. {guidance}".strip()


def worklist_row(row: dict[str, Any], patient_name: str | None = None) -> WorklistRow:
    """The worklist row of one batch result row (see the module's docstring)."""
    common = {
        "referral_id": row["referralId"], "patient_id": row.get("patientId"), "patient_name": patient_name,
        "source": row.get("source") or "", "as_of": row.get("asOf"), "planned_date": row.get("plannedDate"),
        "batch_status": row["status"],
    }  # fmt: skip
    if row["status"] == "error" or row.get("decision") is None:
        problem = row.get("error") or "not evaluated"
        return WorklistRow(**common, status=CANNOT, what_to_do=(f"Fix the input, then run the worklist again: {problem}",),
                           reasons=(), decision_id=None, error=problem)  # fmt: skip
    now, planned = row["decision"], row.get("plannedDecision")
    titles = _titles(now, planned)
    decisions = {now["decisionId"]: now}
    if any(d.get("reason") == DECEASED for d in now.get("deferrals", ())):
        return WorklistRow(**common, status=DEFERRED, reasons=tuple(_reasons(now, titles, False, set())),
                           decision_id=now["decisionId"], decisions=decisions,
                           what_to_do=("Do not book: the record says the patient has died. "
                                       "Check the record with the referrer and close the referral.",))  # fmt: skip
    status_now = decision_status(now)
    status_planned = decision_status(planned) if planned is not None else READY
    repeats = row.get("toRepeat") or []
    if repeats and SERIOUSNESS[status_now] > SERIOUSNESS[NEEDS_DATA]:
        status_now = NEEDS_DATA
    status, decision_id = status_now, now["decisionId"]
    if planned is not None and SERIOUSNESS[status_planned] < SERIOUSNESS[status_now]:
        status, decision_id = status_planned, planned["decisionId"]
        decisions[planned["decisionId"]] = planned
    reasons = _reasons(now, titles, False, set())
    seen = {(d.get("reason", ""), d.get("scope", "PROCEDURE")) for d in now.get("deferrals", ())}
    todo = [_deferral_sentence(d) for d in now.get("deferrals", ())]
    if repeats:
        todo += [_repeat_sentence(item, row.get("plannedDate")) for item in repeats]
        for item in repeats:
            rules = tuple((rid, titles.get(rid, rid)) for rid in item.get("ruleIds", ()))
            reasons.append(Reason(f"{item.get('title') or item.get('concept')} to repeat before the planned date", "DATA", rules))
    if planned is not None:
        later = [d for d in planned.get("deferrals", ()) if (d.get("reason", ""), d.get("scope", "PROCEDURE")) not in seen]
        explained = {rid for item in repeats for rid in item.get("ruleIds", ())}
        later = [d for d in later if not (d.get("reason") == PENDING and set(d.get("ruleIds", ())) <= explained)]
        reasons += _reasons({"deferrals": later}, titles, True, set())
        todo += [f"By the planned date, {day_words(row.get('plannedDate'))}: {_deferral_sentence(d)}" for d in later]
    if status == READY or not todo:
        todo.insert(0, _ready_sentence(now) if status == READY else DESCRIPTIONS[status])
    return WorklistRow(
        **common, status=status, what_to_do=tuple(todo), reasons=tuple(reasons), decision_id=decision_id, decisions=decisions
    )
