"""Evaluating one referral: the decision now, the decision on the planned date, and the results
that will be too old by then.

**The planned date.** The contract measures every interval from the evaluation instant, and a
rule reads a result only while its age is within the rule's window (``age_days ≤
$inr_max_age_days``…). A referral is evaluated twice:

* as of ``asOf`` (the run's instant, or the referral's own): ``decision``, what the record allows
  now;
* on the planned date, with the record as it is known at ``asOf`` (records dated later are left
  out, as the contract's time rules would leave them out at ``asOf``): ``plannedDecision``, what
  the same record will allow on the day if nothing new is recorded. Results age, an acute
  infection or an antibiotic course runs out, a steroid interval passes, surgery comes closer.

**To repeat.** A result is *to repeat* when a rule uses it now and will not be able to on the
planned date because it will be too old for that rule's window: either a rule that fired now
matched it within an ``age_days`` window it will have left by then (a high INR found today
cannot be relied on in three weeks), or a rule that only fires on the planned date does so
because no result of that concept will be within its window (``DATA-INR-CURRENT``: no INR within
7 days), while the newest one is within it now. Each item says which result, until when it
counts (``validUntil`` = taken + window), and when to repeat it: no earlier than ``repeatFrom``
(planned date - window, else it will be too old again on the day) and by ``repeatBy`` (the
planned date), with the rules and parameters behind the window. Aggregates (counts over results,
such as the Kocher criteria) are not looked into.

**Status** of a decision, for sorting a worklist: ``not-now`` (a HARD deferral of the whole
procedure), ``review`` (only SOFT ones: a clinician must review), ``go-ahead`` (perhaps without
some injectates). A referral's ``status`` is its decision's, except that ``go-ahead`` with
results to repeat is ``to-repeat``; ``plannedStatus`` is the planned-date decision's. A referral
that cannot be evaluated has status ``error`` and says why in ``error``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson

from needlepoint.batch.bulk import Line, bundle_of, locate
from needlepoint.batch.referrals import Referral
from needlepoint.core.conditions import ParamRef, resolve_operand
from needlepoint.core.evaluator import Evaluator, format_instant
from needlepoint.core.prepare import PreparedFacts
from needlepoint.core.record import InjectionOrder, PatientRecord, RecordError
from needlepoint.core.resolve import Firing
from needlepoint.core.ruleset import RuleSet
from needlepoint.corpus import OrderFields
from needlepoint.fhir.mapper import record_from_bundle
from needlepoint.intake import COMMAND_LINE_ORDER, apply_order, order_from_fields

STATUSES = ("error", "not-now", "review", "to-repeat", "go-ahead")


@dataclass(frozen=True)
class Options:
    """What every referral of a run shares (picklable: sent to worker processes and Spark
    executors). ``as_of``: the instant for referrals without their own; ``planned``: the planned
    date for those without one (None: no planned-date evaluation); ``order``: --target/--side/
    --intent, overriding the record's own order field by field, each field unless the referral's
    row gives its own (:func:`referral_order`)."""

    ruleset: RuleSet
    as_of: dt.datetime
    planned: dt.datetime | None = None
    order: OrderFields | None = None


@dataclass(frozen=True, slots=True)
class Window:
    """An ``age_days`` bound on an observation concept in one pattern of one rule."""

    rule: str
    position: int  # the rule's place in the rule set, for ordering
    alternative: int
    alias: str
    concept: str
    days: float
    strict: bool  # lt rather than lte
    parameter: str | None
    negated: bool

    def exceeded(self, age_days: float) -> bool:
        return age_days >= self.days if self.strict else age_days > self.days


def age_windows(ruleset: RuleSet) -> dict[str, list[Window]]:
    """Per rule id, every observation pattern of the rule that bounds the result's age."""
    params = ruleset.param_values()
    out: dict[str, list[Window]] = {}
    for position, rule in enumerate(ruleset.rules):
        for a, alternative in enumerate(rule.alternatives):
            for pattern in alternative:
                if pattern.kind != "observation":
                    continue
                concepts = [resolve_operand(t.operand, params) for t in pattern.tests if t.field == "concept" and t.op == "eq"]
                for test in pattern.tests:
                    if test.field != "age_days" or test.op not in ("lt", "lte"):
                        continue
                    parameter = test.operand.name if isinstance(test.operand, ParamRef) else None
                    days = float(resolve_operand(test.operand, params))
                    for concept in concepts:
                        out.setdefault(rule.id, []).append(
                            Window(
                                rule.id, position, a, pattern.alias, concept, days, test.op == "lt", parameter, pattern.negated
                            )
                        )
    return out


def known_at(record: PatientRecord, as_of: dt.datetime) -> PatientRecord:
    """The record as it was known at ``as_of``: every item dated after it left out (an item
    without a date is kept, as the core keeps it)."""

    def kept(items: list) -> list:
        return [item for item in items if item.begun is None or _utc(item.begun) <= as_of]

    return dataclasses.replace(
        record,
        conditions=kept(record.conditions),
        medications=kept(record.medications),
        observations=kept(record.observations),
        allergies=kept(record.allergies),
        prior_injections=kept(record.prior_injections),
        planned_surgeries=kept(record.planned_surgeries),
        data_issues=kept(record.data_issues),
    )


def _utc(instant: dt.datetime) -> dt.datetime:
    return instant.astimezone(dt.timezone.utc) if instant.tzinfo else instant.replace(tzinfo=dt.timezone.utc)


def status_of(decision: dict) -> str:
    """``not-now``, ``review`` or ``go-ahead`` (see the module's docstring)."""
    whole = [d for d in decision.get("deferrals", ()) if d.get("scope") == "PROCEDURE"]
    if any(d.get("severity") == "HARD" for d in whole):
        return "not-now"
    return "review" if whole else "go-ahead"


def _days(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


class ReferralEvaluator:
    """One rule set, compiled once, and the run's options; turns referrals into result rows (the
    dicts of :mod:`needlepoint.batch.output`). Build one per process and reuse it."""

    def __init__(self, options: Options):
        self.options = options
        self.ruleset = options.ruleset
        self.evaluator = Evaluator(options.ruleset)
        self.windows = age_windows(options.ruleset)

    def close(self) -> None:
        self.evaluator.close()

    # -- rows ---------------------------------------------------------------------------------

    def error_row(self, referral: Referral, problem: str, patient_id: str | None = None) -> dict:
        """The result of a referral that cannot be evaluated."""
        return error_row(self.options, referral, problem, patient_id)

    def bundle_row(self, referral: Referral) -> dict:
        """A referral whose record is a Bundle file."""
        if referral.problem is not None:
            return self.error_row(referral, referral.problem)
        assert referral.bundle_path is not None
        try:
            with open(referral.bundle_path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            return self.error_row(referral, f"{referral.where}: cannot read {referral.bundle_path}: {exc.strerror or exc}")
        try:
            bundle = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return self.error_row(referral, f"{referral.where}: not valid JSON: {exc}")
        try:
            record = record_from_bundle(bundle, observation_codes=self.evaluator.observation_codes)
        except RecordError as exc:
            return self.error_row(referral, f"{referral.where}: {exc}", _patient_id(bundle))
        return self.row(referral, record, _patient_id(bundle))

    def patient_rows(self, patient_id: str, lines: list[Line], referrals: list[Referral] | None) -> list[dict]:
        """The rows of one patient of a Bulk Data export: ``lines`` are the patient's lines (some
        may carry a problem), ``referrals`` the CSV's referrals for the patient, or None for one
        referral with the run's defaults (id: the patient id). Lines but no referral from a CSV:
        the patient was not referred, no row. Referrals but no line: the patient is not in the
        export."""
        lines = sorted(lines, key=lambda ln: (ln.file, ln.line))
        if referrals is None:
            if not lines:
                return []
            referrals = [Referral(patient_id, lines[0].where, patient_id=patient_id)]
        if not referrals:
            return []
        if not lines:
            return [self.error_row(r, f"{r.where}: patient {patient_id} is not in the export", patient_id) for r in referrals]
        problems = [ln.problem for ln in lines if ln.problem]
        if problems:
            why = "the patient's record in the export cannot be read whole: " + "; ".join(problems[:5])
            why += f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            return [self.error_row(r, f"{r.where}: {why}", patient_id) for r in referrals]
        bundle, wheres = bundle_of(lines)
        try:
            record = record_from_bundle(bundle, observation_codes=self.evaluator.observation_codes)
        except RecordError as exc:
            return [self.error_row(r, f"{r.where}: {locate(str(exc), wheres)}", patient_id) for r in referrals]
        rows = []
        for referral in referrals:
            row = self.row(referral, record, patient_id)
            if row["error"]:
                row["error"] = locate(row["error"], wheres)
            rows.append(row)
        return rows

    def row(self, referral: Referral, record: PatientRecord, patient_id: str | None) -> dict:
        """Evaluate a referral against its patient's record."""
        record = apply_order(record, referral_order(referral, self.options.order))
        as_of = referral.as_of or self.options.as_of
        planned = referral.planned or self.options.planned
        try:
            prepared, firings = self.evaluator.firings(record, as_of)
            decision = self.evaluator.resolver(firings, prepared, format_instant(as_of))
            planned_decision, to_repeat = None, []
            if planned is not None and planned > as_of:
                p_prepared, p_firings = self.evaluator.firings(known_at(record, as_of), planned)
                planned_decision = self.evaluator.resolver(p_firings, p_prepared, format_instant(planned))
                to_repeat = self.to_repeat(prepared, firings, p_firings, as_of, planned)
        except RecordError as exc:
            return self.error_row(referral, f"{referral.where}: {exc}", patient_id)
        except Exception as exc:  # noqa: BLE001 - a fault costs this referral, not the run
            return self.error_row(referral, f"{referral.where}: internal error: {type(exc).__name__}: {exc}", patient_id)
        row = _empty_row(referral, patient_id)
        status = status_of(decision)
        row.update(
            status="to-repeat" if status == "go-ahead" and to_repeat else status,
            plannedStatus=status_of(planned_decision) if planned_decision is not None else None,
            asOf=decision["asOf"],
            plannedDate=format_instant(planned) if planned else None,
            deferralReasons=[
                d["reason"] if d["scope"] == "PROCEDURE" else f"{d['reason']}/{d['scope']}" for d in decision.get("deferrals", ())
            ],
            missingData=list(dict.fromkeys(m["code"] for m in decision.get("missingData", ()))),
            toRepeat=to_repeat,
            rulesetId=decision["ruleset"]["id"],
            rulesetVersion=decision["ruleset"]["version"],
            decisionId=decision["decisionId"],
            decision=decision,
            plannedDecision=planned_decision,
        )
        return row

    # -- results to repeat --------------------------------------------------------------------

    def to_repeat(self, prepared: PreparedFacts, firings: list[Firing], planned_firings: list[Firing], as_of: dt.datetime,
                  planned: dt.datetime) -> list[dict]:
        """The results a rule relies on now that will be too old for it on the planned date
        (see the module's docstring), one item per result, soonest to expire first."""
        shift = (planned - as_of).total_seconds() / 86400.0
        facts = prepared.facts
        lapsing: dict[int, list[Window]] = {}  # fact id -> the windows it will have left
        for firing in firings:
            for alternative, aliases in firing.matched.items():
                for w in self.windows.get(firing.rule.id, ()):
                    if w.alternative != alternative or w.negated:
                        continue
                    for fid in aliases.get(w.alias, ()):
                        fact = facts[fid]
                        if (
                            fact.get("t") == "observation"
                            and fact.get("concept") == w.concept
                            and w.exceeded(fact["age_days"] + shift)
                        ):
                            lapsing.setdefault(fid, []).append(w)
        fired_now = {f.rule.id for f in firings}
        newest = {fact["concept"]: fid for fid, fact in enumerate(facts) if fact.get("t") == "observation"}
        for firing in planned_firings:
            if firing.rule.id in fired_now:
                continue
            for alternative in firing.matched:
                for w in self.windows.get(firing.rule.id, ()):
                    if w.alternative != alternative or not w.negated or w.concept not in newest:
                        continue
                    fid = newest[w.concept]
                    age = facts[fid]["age_days"]
                    if not w.exceeded(age) and w.exceeded(age + shift):
                        lapsing.setdefault(fid, []).append(w)
        items = []
        for fid, windows in lapsing.items():
            when = prepared.info[fid].when
            concept = facts[fid]["concept"]
            if when is None:
                continue
            days = min(w.days for w in windows)
            rules = sorted({(w.position, w.rule) for w in windows})
            items.append({
                "concept": concept,
                "title": self.ruleset.observations[concept].title if concept in self.ruleset.observations else concept,
                "resultAt": format_instant(when),
                "windowDays": _days(days),
                "validUntil": format_instant(_utc(when) + dt.timedelta(days=days)),
                "repeatFrom": format_instant(planned - dt.timedelta(days=days)),
                "repeatBy": format_instant(planned),
                "ruleIds": [rule for _, rule in rules],
                "parameters": sorted({w.parameter for w in windows if w.parameter}),
            })  # fmt: skip
        items.sort(key=lambda item: (item["validUntil"], item["concept"]))
        return items


def error_row(options: Options, referral: Referral, problem: str, patient_id: str | None = None) -> dict:
    """The result of a referral that cannot be evaluated (no rule engine needed)."""
    row = _empty_row(referral, patient_id or referral.patient_id)
    row["asOf"] = format_instant(referral.as_of or options.as_of)
    planned = referral.planned or options.planned
    row["plannedDate"] = format_instant(planned) if planned else None
    row["rulesetId"], row["rulesetVersion"] = options.ruleset.id, options.ruleset.version
    row["error"] = problem
    return row


def _empty_row(referral: Referral, patient_id: str | None) -> dict[str, Any]:
    """A result row with every column present, in the order of :data:`needlepoint.batch.output.COLUMNS`."""
    return {
        "referralId": referral.id, "patientId": patient_id, "source": referral.where, "status": "error",
        "plannedStatus": None, "asOf": None, "plannedDate": None, "deferralReasons": [], "missingData": [],
        "toRepeat": [], "rulesetId": None, "rulesetVersion": None, "decisionId": None, "error": None,
        "decision": None, "plannedDecision": None,
    }  # fmt: skip


def _patient_id(bundle: Any) -> str | None:
    """The id of the first Patient resource of a Bundle, if it has one."""
    if type(bundle) is not dict or type(bundle.get("entry")) is not list:
        return None
    for entry in bundle["entry"]:
        resource = entry.get("resource") if type(entry) is dict else None
        if type(resource) is dict and resource.get("resourceType") == "Patient":
            rid = resource.get("id")
            return rid if type(rid) is str else None
    return None


def referral_order(referral: Referral, defaults: OrderFields | None) -> InjectionOrder | None:
    """The order given for a referral: its row's target, side and intent, each completed by the
    command line's (``defaults``), or None when neither gives any. It supplies or overrides the
    record's order (:func:`needlepoint.intake.apply_order`): a row's field wins over the command
    line's, and either over the record's."""
    target, side, intent = (own or default for own, default in zip(referral.order, defaults or (None, None, None), strict=True))
    source = referral.where if any(referral.order) else COMMAND_LINE_ORDER
    return order_from_fields(target, side, intent, source=source)
