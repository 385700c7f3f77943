"""CDS Hooks, the parts that need no server: discovery from the rule set, recognising hip injection
orders, decision -> cards (a pure function), the spec validator, the stores and the page."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from needlepoint.cdshooks.cards import OrderContext, cards_from_decision, shorten
from needlepoint.cdshooks.discovery import discovery_document, observation_concepts_read, prefetch_templates
from needlepoint.cdshooks.page import render_decision
from needlepoint.cdshooks.request import RequestProblem, check_call, hip_injection_orders, is_hip_injection
from needlepoint.cdshooks.stores import Feedback, InMemoryDecisionStore, InMemoryFeedbackStore
from needlepoint.cdshooks.validate import validate_discovery, validate_document, validate_feedback, validate_response

SHARED = Path(__file__).resolve().parents[2] / "shared"
CDS_HOOKS = SHARED / "fixtures" / "cds-hooks"
CPT = "http://www.ama-assn.org/go/cpt"
TARGET = "http://needlepoint.dev/fhir/CodeSystem/injection-target"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# --- discovery ----------------------------------------------------------------------------------


def test_discovery_templates_come_from_the_rule_set(hip_ruleset) -> None:
    templates = prefetch_templates(hip_ruleset)
    assert templates["patient"] == "Patient/{{context.patientId}}"
    assert templates["conditions"] == "Condition?patient={{context.patientId}}&clinical-status=active"
    for key in ("medicationRequests", "medicationStatements", "allergies", "procedures", "plannedServiceRequests"):
        assert key in templates
    # one search per observation concept a rule reads, with all its codes, newest first
    concepts = observation_concepts_read(hip_ruleset)
    assert {"inr", "platelets", "glucose", "hba1c", "pregnancy-status"} <= set(concepts)
    assert set(concepts) <= set(hip_ruleset.observations)
    inr = templates["observations-inr"]
    for code in hip_ruleset.observations["inr"].codes:
        assert "http://loinc.org|" + code.partition("#")[2] in inr
    assert inr.endswith("&_sort=-date")
    assert all("draftOrders" not in t for t in templates.values())


def test_discovery_follows_the_rules_not_a_list(hip_ruleset) -> None:
    """Drop every rule and aggregate that reads allergies or INR: their prefetch keys go too."""

    def reads(patterns, kind, concept=None) -> bool:
        return any(p.kind == kind and (concept is None or any(t.operand == concept for t in p.tests)) for p in patterns)

    rules = tuple(
        r for r in hip_ruleset.rules
        if not any(reads(alt, "allergy") or reads(alt, "observation", "inr") for alt in r.alternatives)
    )
    aggregates = tuple(a for a in hip_ruleset.aggregates if not reads(a.patterns, "allergy"))
    trimmed = dataclasses.replace(hip_ruleset, rules=rules, aggregates=aggregates)
    templates = prefetch_templates(trimmed)
    assert "allergies" not in templates and "observations-inr" not in templates
    assert "observations-platelets" in templates


def test_discovery_document_is_valid(hip_ruleset) -> None:
    doc = discovery_document([hip_ruleset])
    assert validate_discovery(doc) == []
    assert [(s["hook"], s["id"]) for s in doc["services"]] == [("order-select", "hip-injection"), ("order-sign", "hip-injection")]


# --- which orders are hip injections ------------------------------------------------------------


def sr(code: str | None = None, site: list[tuple[str, str]] | None = None, **extra) -> dict:
    resource: dict = {"resourceType": "ServiceRequest", "id": "x", "status": "draft", "intent": "order", **extra}
    if code:
        resource["code"] = {"coding": [{"system": CPT, "code": code}]}
    if site:
        resource["bodySite"] = [{"coding": [{"system": s, "code": c} for s, c in site]}]
    return resource


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (sr("72133"), False),  # lumbar spine imaging (PAMA)
        (sr("20610", [("http://snomed.info/sct", "72696002")]), False),  # knee joint: not a hip
        (sr("20610"), True),  # no site given: evaluated, the rules ask for the target
        (sr("20611", [("http://snomed.info/sct", "24136001")]), True),  # hip joint structure
        (sr(None, [(TARGET, "greater-trochanteric-bursa")]), True),
        (sr("27093"), True),  # hip arthrography
        ({"resourceType": "MedicationRequest", "id": "m"}, False),
    ],
)
def test_is_hip_injection(resource: dict, expected: bool) -> None:
    assert is_hip_injection(resource) is expected


def test_order_select_looks_only_at_selections() -> None:
    drafts = {
        "resourceType": "Bundle",
        "entry": [{"resource": sr("20610") | {"id": "hip"}}, {"resource": sr("72133") | {"id": "mri"}}],
    }
    assert [ref for ref, _ in hip_injection_orders(drafts, ["ServiceRequest/mri"])] == []
    assert [ref for ref, _ in hip_injection_orders(drafts, ["ServiceRequest/hip"])] == ["ServiceRequest/hip"]
    assert [ref for ref, _ in hip_injection_orders(drafts, None)] == ["ServiceRequest/hip"]  # order-sign: all


def test_check_call_names_the_bad_field() -> None:
    good = load(CDS_HOOKS / "pama-scenario-01-outbound-request.json")
    assert check_call(good, ("order-select", "order-sign")).orders == []
    for mutate, where in [
        (lambda r: r.pop("hookInstance"), "hookInstance"),
        (lambda r: r.__setitem__("hook", "patient-view"), "hook"),
        (lambda r: r["context"].pop("selections"), "context.selections"),
        (lambda r: r["context"].__setitem__("draftOrders", []), "context.draftOrders"),
        (
            lambda r: (r.pop("fhirServer"), r.__setitem__("fhirAuthorization", {"access_token": "t", "token_type": "Bearer"})),
            "fhirServer",
        ),
    ]:
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(RequestProblem) as caught:
            check_call(bad, ("order-select", "order-sign"))
        assert caught.value.status == 400 and caught.value.issues[0][2] == where


# --- decision -> cards --------------------------------------------------------------------------

ORDER = OrderContext(
    "ServiceRequest/inj",
    sr("20610", [(TARGET, "hip-intra-articular")])
    | {
        "id": "inj",
        "code": {"coding": [{"system": CPT, "code": "20610"}, {"system": CPT, "code": "77002"}], "text": "Fluoro hip injection"},
    },
    "pat-1",
    "enc-1",
)


def decision(**parts) -> dict:
    """A decision in the contract's shape; explanations for every rule named."""
    base = {
        "decisionId": "dec-0001",
        "asOf": "2025-06-02T09:00:00Z",
        "ruleset": {"id": "hip-injection", "version": "1.1.0", "digest": "sha256:x"},
    }
    base.update(parts)
    rule_ids = {
        r
        for key in ("deferrals", "injectates", "cautions", "missingData")
        for item in parts.get(key, ())
        for r in item["ruleIds"]
    }
    rule_ids |= set(parts.get("modality", {}).get("ruleIds", ()))
    base["explanations"] = [
        {
            "ruleId": r,
            "ruleVersion": "1.0.0",
            "title": f"title of {r}",
            "category": "data" if r.startswith("DATA") else "deferral",
            "outcome": "…",
            "rationale": "…",
            "matched": [{"fact": "medication rxnorm#855332 <Warfarin>", "value": "x"}],
        }
        for r in sorted(rule_ids)
    ]
    return base


def render(hip_ruleset, d: dict, hook_instance: str = "hi-1") -> list[dict]:
    cards = cards_from_decision(d, hip_ruleset, ORDER, hook_instance=hook_instance, explanation_url="https://np.example/decisions/dec-0001")
    assert validate_response({"cards": cards}, strict=True) == []
    return cards


def test_deferral_cards_by_severity(hip_ruleset) -> None:
    d = decision(
        deferrals=[
            {
                "reason": "BLEEDING_RISK",
                "severity": "HARD",
                "scope": "PROCEDURE",
                "ruleIds": ["DEF-INR-HIGH"],
                "message": "INR 3.4 is above 3. More text.",
            },
            {
                "reason": "HYPERGLYCEMIA",
                "severity": "SOFT",
                "scope": "CORTICOSTEROID",
                "ruleIds": ["DEF-HBA1C-HIGH"],
                "message": "HbA1c 9 %.",
            },
        ]
    )
    hard, soft = render(hip_ruleset, d)
    assert hard["indicator"] == "critical" and soft["indicator"] == "warning"
    # the coordinator view's words: the same headline the CLI prints and the page shows
    assert hard["summary"] == "Bleeding risk: not now. INR 3.4 is above 3."
    assert (
        soft["summary"]
        == "Blood sugar too high for a steroid injection: corticosteroid (steroid) only after a clinician's review. HbA1c 9 %."
    )
    assert "DEF-INR-HIGH" in hard["detail"] and "\\<Warfarin\\>" in hard["detail"]  # names rule and facts, escaped
    assert hard["extension"] == {
        "dev.needlepoint.decisionId": "dec-0001",
        "dev.needlepoint.order": "ServiceRequest/inj",
        "dev.needlepoint.ruleIds": ["DEF-INR-HIGH"],
    }
    assert hard["links"][0]["url"] == "https://np.example/decisions/dec-0001#rule-DEF-INR-HIGH"
    assert {r["system"] for r in hard["overrideReasons"]} == {"http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes"}
    assert hard["source"]["topic"]["code"] == "deferral"


def test_pending_data_card_creates_the_lab_order(hip_ruleset) -> None:
    msg = "No usable INR from the last 7 days."
    d = decision(
        deferrals=[
            {"reason": "PENDING_DATA", "severity": "HARD", "scope": "PROCEDURE", "ruleIds": ["DATA-INR-CURRENT"], "message": msg}
        ],
        missingData=[{"code": "INR", "message": msg, "ruleIds": ["DATA-INR-CURRENT"]}],
    )
    (card,) = render(hip_ruleset, d)  # the missing INR is on the deferral card, not a card of its own
    assert card["source"]["topic"]["code"] == "data"
    (suggestion,) = card["suggestions"]
    (action,) = suggestion["actions"]
    assert action["type"] == "create"
    lab = action["resource"]
    assert lab["resourceType"] == "ServiceRequest" and lab["status"] == "draft"
    assert lab["code"]["coding"][0] == {"system": "http://loinc.org", "code": "6301-6", "display": "INR"}
    assert lab["subject"] == {"reference": "Patient/pat-1"} and lab["encounter"] == {"reference": "Encounter/enc-1"}


def test_pregnancy_status_offers_alternatives(hip_ruleset) -> None:
    rule = next(r for r in hip_ruleset.rules if r.then.missing_data == "PREGNANCY_STATUS")
    d = decision(
        deferrals=[
            {
                "reason": "PENDING_DATA",
                "severity": "HARD",
                "scope": "PROCEDURE",
                "ruleIds": [rule.id],
                "message": "Pregnancy status unknown.",
            }
        ]
    )
    (card,) = render(hip_ruleset, d)
    codes = [s["actions"][0]["resource"]["code"]["coding"][0]["code"] for s in card["suggestions"]]
    assert "82810-3" in codes and "2106-3" in codes
    assert card["selectionBehavior"] == "at-most-one"  # one of them is enough


def test_modality_card_updates_the_draft_order(hip_ruleset) -> None:
    d = decision(
        modality={
            "preferred": "ULTRASOUND",
            "acceptable": ["FLUOROSCOPY"],
            "avoid": ["LANDMARK"],
            "ruleIds": ["MOD-IA-HIP-DEFAULT"],
        }
    )
    (card,) = render(hip_ruleset, d)
    assert card["selectionBehavior"] == "at-most-one"
    # the order asks for fluoroscopy (77002): the one recommended suggestion switches it to 20611
    (us,) = [s for s in card["suggestions"] if s.get("isRecommended")]
    (action,) = us["actions"]
    assert action["type"] == "update" and action["resource"]["id"] == "inj"
    assert [c["code"] for c in action["resource"]["code"]["coding"]] == ["20611"]
    assert ORDER.resource["code"]["coding"][1]["code"] == "77002"  # the client's draft is untouched
    # already as preferred: an info card, nothing to change
    d = decision(modality={"preferred": "FLUOROSCOPY", "acceptable": ["ULTRASOUND"], "ruleIds": ["MOD-IA-HIP-DEFAULT"]})
    (card,) = render(hip_ruleset, d)
    assert card["indicator"] == "info" and "suggestions" not in card and "as ordered" in card["summary"]


def test_modality_avoided_by_the_rules_is_a_warning(hip_ruleset) -> None:
    d = decision(modality={"preferred": "ULTRASOUND", "avoid": ["FLUOROSCOPY"], "ruleIds": ["MOD-IA-HIP-DEFAULT"]})
    (card,) = render(hip_ruleset, d)
    assert card["indicator"] == "warning" and len(card["suggestions"]) == 1


def test_injectates_cautions_and_leftover_missing_data(hip_ruleset) -> None:
    d = decision(
        injectates=[
            {"category": "CORTICOSTEROID", "recommendation": "SUGGESTED", "ruleIds": ["INJ-OA-HIP-CS"], "message": "Steroid."},
            {"category": "LOCAL_ANESTHETIC", "recommendation": "SUGGESTED", "ruleIds": ["INJ-OA-HIP-CS"], "message": "LA."},
            {
                "category": "IODINATED_CONTRAST",
                "recommendation": "AVOID",
                "ruleIds": ["INJ-CONTRAST-ALLERGY"],
                "message": "Allergy.",
            },
        ],
        cautions=[{"code": "ANTITHROMBOTIC_CONTINUE", "ruleIds": ["CAU-ANTITHROMBOTIC-CONTINUE"], "message": "Do not stop it."}],
        missingData=[{"code": "unit-unknown:loinc#777-3", "message": "Platelets without a unit.", "ruleIds": ["DATA-ISSUE"]}],
    )
    suggested, avoid, caution, missing = render(hip_ruleset, d)
    assert (
        suggested["indicator"] == "info"
        and suggested["summary"] == "Corticosteroid (steroid): suggested. Local anaesthetic: suggested."
    )
    assert avoid["indicator"] == "critical" and avoid["summary"] == "Iodinated contrast (X-ray dye): avoid. Allergy."
    assert caution["indicator"] == "info" and missing["indicator"] == "info"
    assert missing["summary"] == "Records to check or complete: Platelets without a unit."


def test_cards_are_a_pure_function(hip_ruleset) -> None:
    d = decision(
        deferrals=[{"reason": "PREGNANCY", "severity": "HARD", "scope": "PROCEDURE", "ruleIds": ["DEF-PREG"], "message": "m"}],
        modality={"preferred": "ULTRASOUND", "ruleIds": ["MOD-IA-HIP-DEFAULT"]},
    )
    first, again = render(hip_ruleset, d), render(hip_ruleset, copy.deepcopy(d))
    assert first == again
    other = render(hip_ruleset, d, hook_instance="hi-2")
    assert {c["uuid"] for c in first}.isdisjoint(c["uuid"] for c in other)


def test_summary_is_cut_at_a_word() -> None:
    text = "word " * 60
    assert len(shorten(text)) < 140 and shorten(text).endswith("…")
    assert shorten("short") == "short"


# --- the validator ------------------------------------------------------------------------------


def good_card() -> dict:
    return {
        "uuid": "4a3c1f7e-1111-4222-8333-944455556666",
        "summary": "s",
        "indicator": "info",
        "source": {"label": "x"},
        "suggestions": [
            {
                "label": "a",
                "uuid": "4a3c1f7e-1111-4222-8333-944455556667",
                "actions": [{"type": "create", "description": "d", "resource": {"resourceType": "ServiceRequest"}}],
            }
        ],
        "selectionBehavior": "at-most-one",
    }


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.pop("selectionBehavior"), "cds-resp-6"),
        (
            lambda c: c["suggestions"].extend(
                [
                    {"label": "b", "uuid": "4a3c1f7e-1111-4222-8333-944455556668", "isRecommended": True},
                    {"label": "c", "uuid": "4a3c1f7e-1111-4222-8333-944455556669", "isRecommended": True},
                ]
            ),
            "cds-resp-1",
        ),
        (
            lambda c: c["suggestions"][0]["actions"].append(
                {"type": "delete", "description": "d", "resource": {"resourceType": "X"}}
            ),
            "cds-resp-2",
        ),
        (
            lambda c: c.__setitem__("links", [{"label": "l", "url": "https://x", "type": "absolute", "appContext": "a"}]),
            "cds-resp-3",
        ),
        (lambda c: c.__setitem__("overrideReasons", [{"system": "s", "code": "c"}]), "overrideReasons[0].display: required"),
        (lambda c: c["suggestions"][0]["actions"][0].pop("description"), "description: required"),
        (lambda c: c["suggestions"][0].__setitem__("actionSelectionBehavior", "some"), "actionSelectionBehavior"),
        (lambda c: c.__setitem__("summary", "x" * 140), "under 140"),
        (lambda c: c.__setitem__("detail", ""), "empty str"),
        (lambda c: c.__setitem__("links", []), "empty list"),
        (lambda c: c.__setitem__("detail", None), "null"),
        (lambda c: c.__setitem__("indicator", "hard-stop"), "not one of"),
        (lambda c: c.__setitem__("extension", {"nodots": 1}), "reverse-domain"),
        (lambda c: c.pop("uuid"), "uuid: required"),
    ],
)
def test_validator_catches(mutate, expected: str) -> None:
    card = good_card()
    assert validate_response({"cards": [card]}, strict=True) == []
    mutate(card)
    problems = validate_response({"cards": [card]}, strict=True)
    assert any(expected in p for p in problems), problems


def test_validator_on_the_shared_fixtures() -> None:
    assert validate_response({"cards": []}) == []
    assert validate_response(load(CDS_HOOKS / "davinci-crd-CRDServiceResponse2.json")) == []
    pama = validate_response(load(CDS_HOOKS / "pama-scenario-02-suggestion-response.json"))
    assert pama == ["$.cards[0].selectionBehavior: cds-resp-6: required when suggestions are present"]


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            {
                "card": "c",
                "outcome": "accepted",
                "outcomeTimestamp": "2021-12-11T10:05:31Z",
                "acceptedSuggestions": [{"id": "s"}],
            },
            None,
        ),
        ({"card": "c", "outcome": "overridden", "outcomeTimestamp": "2021-12-11T10:05:31Z"}, None),
        ({"card": "c", "outcome": "ignored", "outcomeTimestamp": "2021-12-11T10:05:31Z"}, "not one of"),  # cds-fb-1
        ({"card": "c", "outcome": "accepted", "outcomeTimestamp": "2021-12-11T10:05:31Z"}, "cds-fb-2"),
        (
            {
                "card": "c",
                "outcome": "overridden",
                "outcomeTimestamp": "2021-12-11T10:05:31Z",
                "overrideReason": {"extension": {"a.b": 1}},
            },
            "cds-fb-3",
        ),
        ({"card": "c", "outcome": "overridden", "outcomeTimestamp": "yesterday"}, "outcomeTimestamp"),
        ({"outcome": "overridden", "outcomeTimestamp": "2021-12-11T10:05:31Z"}, "card: required"),
    ],
)
def test_feedback_validator(item: dict, expected: str | None) -> None:
    problems = validate_feedback({"feedback": [item]})
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_validate_document_guesses_the_kind() -> None:
    assert validate_document({"services": []})[0] == "discovery"
    assert validate_document({"feedback": []})[0] == "feedback"
    assert validate_document({"cards": []}) == ("response", [])


# --- stores and page ----------------------------------------------------------------------------


def test_feedback_store_is_idempotent() -> None:
    store = InMemoryFeedbackStore()
    item = {"card": "c", "outcome": "overridden", "outcomeTimestamp": "2021-12-11T10:05:31Z",
            "overrideReason": {"reason": {"system": "s", "code": "risk-benefit-ratio"}, "userComment": "ok"}}
    assert store.add(Feedback.from_json("hip-injection", item)) is True
    assert store.add(Feedback.from_json("hip-injection", copy.deepcopy(item))) is False
    assert store.add(Feedback.from_json("other", item)) is True
    assert [f.override_code for f in store.items()] == ["risk-benefit-ratio", "risk-benefit-ratio"]


def test_decision_store_keeps_the_most_recent() -> None:
    store = InMemoryDecisionStore(capacity=2)
    for i in range(3):
        store.put({"decisionId": f"d{i}"})
    assert store.get("d0") is None and store.get("d2") == {"decisionId": "d2"}


def test_page_escapes_and_anchors(hip_ruleset) -> None:
    d = decision(
        deferrals=[
            {
                "reason": "PREGNANCY",
                "severity": "HARD",
                "scope": "PROCEDURE",
                "ruleIds": ["DEF-PREG"],
                "message": "<script>alert(1)</script>",
            }
        ]
    )
    html = render_decision(d)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'id="rule-DEF-PREG"' in html and 'href="#rule-DEF-PREG"' in html
    assert "http" not in html.split("<body>")[1]  # nothing fetched from the network


# -- the same trace, three views: cards, the coordinator text, the explanation page ----------------

_SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "synthea"


def _visible(html_text: str) -> str:
    """What a reader of the page sees: tags dropped, entities decoded, spaces collapsed."""
    import html as html_module
    import re

    return " ".join(html_module.unescape(re.sub(r"<[^>]+>", " ", html_text)).split())


def _unmarked(markdown: str) -> str:
    """A card's Markdown as read: the escapes removed, spaces collapsed."""
    import re

    return " ".join(re.sub(r"\\(.)", r"\1", markdown).split())


@pytest.mark.parametrize("name", ["Mafalda", "Floyd", "Tony", "Gayla", "Rufus"])
def test_cards_text_and_page_say_the_same_things(hip_ruleset, hip_evaluator, name: str) -> None:
    """For real Synthea decisions, every reason to wait, the guidance and every injectate is said in
    the same words on the card (summary and detail), in the coordinator's text and on the page:
    one wording, three views."""
    import datetime as dt

    from needlepoint.core.record import InjectionOrder
    from needlepoint.fhir import record_from_bundle
    from needlepoint.views.coordinator import (
        deferral_item,
        injectate_item,
        modality_item,
        render as coordinator_text,
        titles_by_rule,
    )

    paths = sorted(_SYNTHEA.glob(f"{name}_*.json"))
    if not paths:
        pytest.skip(f"no Synthea fixture for {name}")
    record = record_from_bundle(paths[0].read_bytes())
    if record.order is None:
        record = record.with_order(InjectionOrder("hip-intra-articular", "right", "therapeutic"))
    decision = hip_evaluator.evaluate(record, dt.datetime(2025, 6, 2, 9, tzinfo=dt.timezone.utc))
    order = {"resourceType": "ServiceRequest", "id": "inj", "status": "draft", "intent": "order",
             "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "20611"}]}}
    cards = cards_from_decision(decision, hip_ruleset, OrderContext("ServiceRequest/inj", order, "p1"),
                                hook_instance="hi-3v", explanation_url="https://np.example/decisions/x")
    text = " ".join(coordinator_text(decision).split())
    page = _visible(render_decision(decision))
    card_text = [(c["summary"], _unmarked(c["detail"])) for c in cards]

    said: list[str] = []
    for deferral in decision.get("deferrals", ()):
        item = deferral_item(deferral)
        # the card for this deferral: its summary opens with the headline, its detail holds the message
        assert any(
            summary.startswith(item.headline) and all(d in detail for d in item.details) for summary, detail in card_text
        ), item
        said += [item.headline, *item.details]
    guidance = modality_item(decision.get("modality"), titles_by_rule(decision))
    if guidance is not None:
        assert any(guidance.headline in detail and all(d in detail for d in guidance.details) for _, detail in card_text)
        said += [guidance.headline, *guidance.details]
    for injectate in decision.get("injectates", ()):
        item = injectate_item(injectate)
        assert any(item.headline in summary or item.headline in detail for summary, detail in card_text), item
        said.append(item.headline)
    assert said, "a hip injection decision always says something"
    for sentence in said:
        plain = " ".join(sentence.split())
        assert plain in text, f"not in the coordinator text: {plain!r}"
        assert plain in page, f"not on the page: {plain!r}"
