"""The referral coordinator's view of a decision: can the injection go ahead, and if not, what to
do about it, in plain words.

It reads the contract's decision JSON (a dict, whatever road it came by) and returns a
:class:`CoordinatorView`: a verdict and sections of items, each a headline with the details a
person acts on. :func:`view_lines` lays it out as styled lines, and :func:`render` as plain text
at an optional width. Terminal concerns (detecting one, colours, its width) belong to the caller.

The wording of each part is made once, here, and shared: :func:`deferral_item`,
:func:`modality_item` and :func:`injectate_item` say what a deferral, the guidance and an
injectate mean and what to do about them; the CLI text, the CDS Hooks cards and the explanation
page (``needlepoint.cdshooks``) all use them, so the three views of one decision say the same
thing in the same words. Each item also carries the ids of the rules behind it (``rule_ids``),
which the text leaves out and the page links to.

What it shows and what it leaves out:

* The rule messages carry the specifics (the drug, the value with its unit and date, how old it is,
  the threshold, what to obtain and by when); rule sets write them for people. The view adds plain
  names for the decision's vocabulary (``BLEEDING_RISK`` → "Bleeding risk") and never shows rule
  ids, missing-data codes (``unit-unknown:egfr``) or caution codes: those stay in the JSON.
* Each fact is said once: a message already shown (a PENDING_DATA deferral and its missingData
  entry, a caution that also decided an injectate) is not repeated further down.
* No decoration that a pipe would keep: no padding, no wrapping unless a width is given.
"""

from __future__ import annotations

import datetime as dt
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REASONS = {
    "JOINT_INFECTION_SUSPECTED": "Possible infection of the hip joint",
    "SYSTEMIC_INFECTION": "Infection elsewhere in the body, or fever",
    "ENTRY_SITE_INFECTION": "Skin infection where the needle would go in",
    "BLEEDING_RISK": "Bleeding risk",
    "INJECTATE_ALLERGY": "Allergy to a medicine that would be injected",
    "RECENT_CORTICOSTEROID_INJECTION": "A steroid injection was given too recently",
    "UPCOMING_ARTHROPLASTY": "Hip replacement surgery is planned soon",
    "HYPERGLYCEMIA": "Blood sugar too high for a steroid injection",
    "PREGNANCY": "Pregnancy",
    "TARGET_MISMATCH": "The injection site may not fit the diagnosis",
    "CONSERVATIVE_CARE_INCOMPLETE": "Treatment without injections not yet tried long enough",
    "PENDING_DATA": "A result or detail is missing",
    "PATIENT_DECEASED": "The record says the patient has died",
}
MODALITIES = {"FLUOROSCOPY": "fluoroscopy (X-ray)", "ULTRASOUND": "ultrasound", "LANDMARK": "landmark guidance (no imaging)"}
INJECTATES = {
    "LOCAL_ANESTHETIC": "Local anaesthetic",
    "CORTICOSTEROID": "Corticosteroid (steroid)",
    "HYALURONIC_ACID": "Hyaluronic acid",
    "PLATELET_RICH_PLASMA": "Platelet-rich plasma",
    "IODINATED_CONTRAST": "Iodinated contrast (X-ray dye)",
    "GADOLINIUM_CONTRAST": "Gadolinium contrast (MRI dye)",
}
RECOMMENDATIONS = {"SUGGESTED": "suggested", "CAUTION": "use with caution", "NOT_SUGGESTED": "not suggested", "AVOID": "avoid"}

# What the verdict is, for styling and for callers that act on it (a worklist's column, a card's indicator).
NOT_NOW, REVIEW_FIRST, GO_AHEAD_WITHOUT_SOME, GO_AHEAD = "not-now", "review-first", "go-ahead-without-some", "go-ahead"
VERDICTS = {
    NOT_NOW: "NOT NOW: the injection has to wait. Act on the reasons below, then have the request checked again.",
    REVIEW_FIRST: "ONLY AFTER A CLINICIAN'S REVIEW: a clinician has to look at the reasons below before the injection is booked.",
    GO_AHEAD_WITHOUT_SOME: "CAN GO AHEAD, without the medicines held back below.",
    GO_AHEAD: "CAN GO AHEAD as far as the rules can tell.",
}


@dataclass(frozen=True)
class Item:
    """One thing to know or do: a headline and the sentences under it, and the rules behind it
    (not shown in the text; the explanation page links them)."""

    headline: str
    details: tuple[str, ...] = ()
    rule_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Section:
    title: str
    items: tuple[Item, ...]


@dataclass(frozen=True)
class CoordinatorView:
    """A decision as a coordinator reads it. ``status`` is one of the VERDICTS keys."""

    heading: str
    status: str
    verdict: str
    sections: tuple[Section, ...] = ()
    reference: str = ""


@dataclass(frozen=True)
class Line:
    """One logical line of the layout: ``text`` after ``indent`` spaces and a ``bullet`` (a wrapped
    continuation hangs under the text), with a ``style`` name a terminal may colour:
    heading, not-now, review-first, go-ahead-without-some, go-ahead, section, headline, detail, note."""

    text: str
    style: str = "detail"
    indent: int = 0
    bullet: str = ""


def words(table: dict[str, str], name: str) -> str:
    """The plain words for a vocabulary value (a readable form of the name for a new value)."""
    return table.get(name, name.replace("_", " ").capitalize())


def _when(as_of: str) -> str:
    """The decision's instant as ``2 June 2025, 09:00 UTC`` (the text itself if unreadable)."""
    try:
        instant = dt.datetime.fromisoformat(as_of.replace("Z", "+00:00")).astimezone(dt.timezone.utc)
    except ValueError:
        return as_of
    return f"{instant.day} {instant:%B} {instant.year}, {instant:%H:%M} UTC"


def _status(deferrals: list[dict]) -> str:
    whole = [d for d in deferrals if d.get("scope", "PROCEDURE") == "PROCEDURE"]
    if any(d.get("severity") == "HARD" for d in whole):
        return NOT_NOW
    if whole:
        return REVIEW_FIRST
    return GO_AHEAD_WITHOUT_SOME if deferrals else GO_AHEAD


def _firmness(deferral: Mapping[str, Any]) -> str:
    """How firmly a deferral holds, and what: the whole injection or one medicine."""
    scope = deferral.get("scope", "PROCEDURE")
    hard = deferral.get("severity") == "HARD"
    if scope == "PROCEDURE":
        return "not now" if hard else "only after a clinician's review"
    medicine = words(INJECTATES, scope).lower()
    return f"no {medicine} for now" if hard else f"{medicine} only after a clinician's review"


class _Said:
    """The messages shown so far, so that each fact is said once: a message already contained in
    one shown (merged entries join their rules' messages) is not shown again."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def new(self, message: str | None) -> str | None:
        message = (message or "").strip()
        if not message or any(message in text for text in self.texts):
            return None
        self.texts.append(message)
        return message


def deferral_item(deferral: Mapping[str, Any]) -> Item:
    """A deferral in plain words: ``Bleeding risk: not now.`` and the rule's message under it."""
    message = (deferral.get("message") or "").strip()
    headline = f"{words(REASONS, deferral.get('reason', ''))}: {_firmness(deferral)}."
    return Item(headline, (message,) if message else (), tuple(deferral.get("ruleIds", ())))


def _lower_first(title: str) -> str:
    """A rule title inside a sentence: first letter lowered unless it starts an acronym (INR)."""
    return title[:1].lower() + title[1:] if title[1:2].islower() else title


def modality_item(modality: Mapping[str, Any] | None, titles_by_rule: dict[str, str]) -> Item | None:
    """The guidance in plain words: ``Use fluoroscopy (X-ray); ultrasound is also acceptable;
    avoid ...``, and ``Because: `` the titles of the rules behind it. None when there is none."""
    if not modality or not (modality.get("preferred") or modality.get("acceptable") or modality.get("avoid")):
        return None
    parts = []
    if modality.get("preferred"):
        parts.append(f"Use {words(MODALITIES, modality['preferred'])}")
    if modality.get("acceptable"):
        also = " or ".join(words(MODALITIES, m) for m in modality["acceptable"])
        parts.append(f"{also} is also acceptable" if parts else f"Use {also}")
    if modality.get("avoid"):
        parts.append("avoid " + " and ".join(words(MODALITIES, m) for m in modality["avoid"]))
    headline = "; ".join(parts)
    rule_ids = tuple(modality.get("ruleIds", ()))
    titles = [titles_by_rule[rid] for rid in rule_ids if rid in titles_by_rule]
    why = ("Because: " + "; ".join(_lower_first(t) for t in titles) + ".",) if titles else ()
    return Item(headline[:1].upper() + headline[1:] + ".", why, rule_ids)


def injectate_item(injectate: Mapping[str, Any]) -> Item:
    """An injectate in plain words: ``Corticosteroid (steroid): avoid.`` and the rule's message."""
    advice = words(RECOMMENDATIONS, injectate.get("recommendation", "")).lower()
    message = (injectate.get("message") or "").strip()
    return Item(f"{words(INJECTATES, injectate.get('category', ''))}: {advice}.", (message,) if message else (),
                tuple(injectate.get("ruleIds", ())))


def titles_by_rule(decision: dict[str, Any]) -> dict[str, str]:
    """Each explained rule's title, by rule id."""
    return {e["ruleId"]: e["title"] for e in decision.get("explanations", []) if e.get("ruleId") and e.get("title")}


def coordinator_view(decision: dict[str, Any]) -> CoordinatorView:
    """What a referral coordinator needs from ``decision`` (the contract's JSON object)."""
    said = _Said()
    deferrals = decision.get("deferrals", [])
    status = _status(deferrals)
    verdict = VERDICTS[status]
    if any(d.get("reason") == "PATIENT_DECEASED" for d in deferrals):
        verdict = "NOT NOW: the record says this patient has died; see below."
    sections: list[Section] = []

    reasons = []
    for d in deferrals:
        item = deferral_item(d)
        message = said.new(d.get("message"))
        reasons.append(Item(item.headline, (message,) if message else (), item.rule_ids))
    if reasons:
        sections.append(Section("Reasons to wait", tuple(reasons)))

    guidance = modality_item(decision.get("modality"), titles_by_rule(decision))
    if guidance is not None:
        sections.append(Section("Image guidance", (guidance,)))

    medicines = []
    for inj in decision.get("injectates", []):
        item = injectate_item(inj)
        message = said.new(inj.get("message"))
        if message is None and inj.get("message") and inj.get("recommendation") != "SUGGESTED":
            message = "The reason is given above."  # said once, but a held-back medicine still points to why
        medicines.append(Item(item.headline, (message,) if message else (), item.rule_ids))
    if medicines:
        sections.append(Section("Medicines to inject", tuple(medicines)))

    cautions = [
        Item(message, (), tuple(c.get("ruleIds", ())))
        for c in decision.get("cautions", [])
        if (message := said.new(c.get("message")))
    ]
    if cautions:
        sections.append(Section("Before and during the injection", tuple(cautions)))

    missing = [
        Item(message, (), tuple(m.get("ruleIds", ())))
        for m in decision.get("missingData", [])
        if (message := said.new(m.get("message")))
    ]
    if missing:
        sections.append(Section("Records to check or complete", tuple(missing)))

    ruleset = decision.get("ruleset", {})
    named = f"{ruleset.get('id', '')} {ruleset.get('version', '')}"
    reference = f"Reference {decision.get('decisionId', '')}; rule set {named}.".replace("  ", " ")
    return CoordinatorView(
        heading=f"Hip injection request, checked on {_when(decision.get('asOf', ''))}",
        status=status,
        verdict=verdict,
        sections=tuple(sections),
        reference=reference,
    )


def view_lines(view: CoordinatorView) -> list[Line]:
    """The view laid out: heading, verdict, then each section with bulleted items, one logical line
    per sentence group (wrapping is the renderer's business); blank lines are empty texts."""
    lines = [Line(view.heading, "heading"), Line(view.verdict, view.status)]
    for section in view.sections:
        lines += [Line(""), Line(section.title, "section")]
        for item in section.items:
            lines.append(Line(item.headline, "headline", indent=0, bullet="- "))
            lines += [Line(detail, "detail", indent=2) for detail in item.details]
    if view.reference:
        lines += [Line(""), Line(view.reference, "note")]
    return lines


def wrap(line: Line, width: int | None) -> list[str]:
    """``line`` as physical lines: one when ``width`` is None, else wrapped at ``width`` between
    words (never inside a word or at a hyphen), continuations hanging under the text."""
    lead = " " * line.indent + line.bullet
    if not line.text:
        return [""]
    if width is None:
        return [lead + line.text]
    hang = " " * len(lead)
    return textwrap.wrap(
        line.text,
        width=max(width, len(lead) + 20),
        initial_indent=lead,
        subsequent_indent=hang,
        break_long_words=False,
        break_on_hyphens=False,
    )


def render(decision: dict[str, Any], width: int | None = None) -> str:
    """The coordinator's view of ``decision`` as plain text: unwrapped, or wrapped at ``width``."""
    return "\n".join(text for line in view_lines(coordinator_view(decision)) for text in wrap(line, width)) + "\n"


__all__ = [
    "CoordinatorView", "Section", "Item", "Line", "coordinator_view", "view_lines", "wrap", "render", "VERDICTS",
    "deferral_item", "modality_item", "injectate_item", "titles_by_rule",
]
