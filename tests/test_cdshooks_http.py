"""CDS Hooks over real HTTP: a uvicorn server on a loopback port, an httpx client, a gRPC server on
the same Engine for comparison, and a stand-in FHIR server for the prefetch fallback.

Every response this suite receives from the service is checked by the spec validator
(``checked``), not by eye.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from needlepoint.cdshooks.app import DECISION_HEADER, Unauthorized, create_app
from needlepoint.cdshooks.cards import OrderContext, cards_from_decision
from needlepoint.cdshooks.discovery import discovery_document, prefetch_templates
from needlepoint.cdshooks.server import start_http
from needlepoint.cdshooks.stores import InMemoryFeedbackStore
from needlepoint.cdshooks.validate import validate_discovery, validate_response
from needlepoint.server.service import Engine
from needlepoint.server.servicer import start_server

SHARED = Path(__file__).resolve().parents[2] / "shared"
CDS_HOOKS = SHARED / "fixtures" / "cds-hooks"
SYNTHEA = SHARED / "fixtures" / "synthea"
AS_OF = dt.datetime(2020, 6, 1, 9, 0, tzinfo=dt.timezone.utc)
CPT = "http://www.ama-assn.org/go/cpt"
TOKEN = "test-token-not-a-secret"


# --- a stand-in FHIR server: search results from one patient's bundle ----------------------------


def _tokens(codeable: Any) -> set[str]:
    if not isinstance(codeable, dict):
        return set()
    return {f"{c.get('system')}|{c.get('code')}" for c in codeable.get("coding", ()) if isinstance(c, dict)}


def _status(resource: dict, key: str) -> str | None:
    value = resource.get(key)
    if isinstance(value, dict):  # CodeableConcept (clinicalStatus)
        codes = [c.get("code") for c in value.get("coding", ())]
        return codes[0] if codes else None
    return value


def fhir_search(resources: list[dict], query: str) -> dict | None:
    """What a FHIR server answers to ``query`` (a prefetch template with the patient filled in) for
    a one-patient record: a read gives the resource or None, a search a searchset Bundle."""
    path, _, raw = query.partition("?")
    if not raw:
        rtype, _, rid = path.partition("/")
        return next((r for r in resources if r["resourceType"] == rtype and r.get("id") == rid), None)
    params = {k: v[0] for k, v in parse_qs(raw).items()}
    found = [r for r in resources if r["resourceType"] == path]
    if "clinical-status" in params:
        found = [r for r in found if _status(r, "clinicalStatus") == params["clinical-status"]]
    if "status" in params:
        found = [r for r in found if r.get("status") == params["status"]]
    if "code" in params:
        wanted = set(params["code"].split(","))
        found = [r for r in found if _tokens(r.get("code")) & wanted]
    if params.get("_sort") == "-date":
        found.sort(key=lambda r: r.get("effectiveDateTime") or (r.get("effectivePeriod") or {}).get("start") or "", reverse=True)
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in found]}


class StandInFhir:
    """A tiny FHIR server on 127.0.0.1 serving searches over one bundle, in pages, recording every
    request (path, Authorization header). ``delay`` slows every answer down."""

    def __init__(self, resources: list[dict], page_size: int = 25) -> None:
        self.resources = resources
        self.page_size = page_size
        self.delay = 0.0
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append((self.path, self.headers.get("Authorization")))
                time.sleep(outer.delay)
                if not self.path.startswith("/fhir/"):
                    self.send_response(500)
                    self.end_headers()
                    return
                parts = urlsplit(self.path)
                query = parts.path.removeprefix("/fhir/") + (f"?{parts.query}" if parts.query else "")
                page = 0
                if "&_page=" in query:
                    query, _, number = query.rpartition("&_page=")
                    page = int(number)
                result = fhir_search(outer.resources, query)
                if result is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if result["resourceType"] == "Bundle":
                    entries = result["entry"]
                    result["entry"] = entries[page * outer.page_size:(page + 1) * outer.page_size]
                    if (page + 1) * outer.page_size < len(entries):
                        result["link"] = [{"relation": "next", "url": f"{outer.base}/{query}&_page={page + 1}"}]
                body = json.dumps(result).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.request_queue_size = 128  # the service fetches several keys at once
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        # shutdown() waits for serve_forever's next poll: 50 ms rather than the default 0.5 s
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- requests built from the Synthea fixtures ------------------------------------------------------


def hip_order(patient_id: str, code: str = "20610") -> dict:
    return {
        "resourceType": "ServiceRequest",
        "id": "hip-inj-1",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": CPT, "code": code}]},
        "orderDetail": [
            {"coding": [{"system": "http://needlepoint.dev/fhir/CodeSystem/injection-intent", "code": "therapeutic"}]}
        ],
        "bodySite": [
            {
                "coding": [
                    {"system": "http://needlepoint.dev/fhir/CodeSystem/injection-target", "code": "hip-intra-articular"},
                    {"system": "http://snomed.info/sct", "code": "24028007", "display": "Right"},
                ]
            }
        ],
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def synthea(path: Path) -> tuple[str, list[dict]]:
    bundle = json.loads(path.read_text())
    resources = [e["resource"] for e in bundle["entry"]]
    patient_id = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    return patient_id, resources


def hook_request(hook: str, patient_id: str, order: dict, prefetch: dict | None, **extra: Any) -> dict:
    request: dict = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "userId": "Practitioner/dr-1",
            "patientId": patient_id,
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
        },
        **extra,
    }
    if hook == "order-select":
        request["context"]["selections"] = [f"ServiceRequest/{order['id']}"]
    if prefetch is not None:
        request["prefetch"] = prefetch
    return request


def full_prefetch(templates: dict[str, str], patient_id: str, resources: list[dict]) -> dict:
    return {key: fhir_search(resources, t.replace("{{context.patientId}}", patient_id)) for key, t in templates.items()}


# --- the servers ------------------------------------------------------------------------------------


class Servers:
    """gRPC and CDS Hooks over HTTP on one Engine (evaluation instant fixed), in a background loop."""

    def __init__(self) -> None:
        self.engine = Engine.load()  # gRPC calls pass as_of; the HTTP app gets the same instant as its clock
        self.feedback = InMemoryFeedbackStore()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.grpc = self.run(start_server(self.engine, "127.0.0.1:0", reuse_port=False))
        self.http = self.run(start_http(self.engine, "127.0.0.1", 0, grace=1, insecure_dev=True, clock=lambda: AS_OF,
                                        feedback_store=self.feedback, fhir_timeout=3.0))
        self.url = f"http://127.0.0.1:{self.http.port}"

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.run(self.http.stop(1))
        self.run(self.grpc.stop(1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    running = Servers()
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(servers: Servers) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=servers.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def templates(servers: Servers) -> dict[str, str]:
    return prefetch_templates(servers.engine.registry.get("hip-injection").ruleset)


def checked(response: httpx.Response) -> dict:
    """The JSON of a 200 service response, after the spec validator (strict: uuids too) passed it."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert validate_response(body, strict=True) == [], json.dumps(body, indent=1)[:3000]
    return body


def outcome(response: httpx.Response, status: int) -> list[dict]:
    """The issues of an OperationOutcome error answer."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"]


# --- discovery and the quick answer -----------------------------------------------------------------


def test_discovery(client: httpx.Client, servers: Servers) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    doc = response.json()
    assert validate_discovery(doc) == []
    assert doc == discovery_document([servers.engine.registry.get("hip-injection").ruleset])


@pytest.mark.parametrize("name", ["pama-scenario-01-outbound-request.json", "davinci-crd-CRDServiceRequest.json"])
def test_shared_fixtures_are_not_hip_injections(client: httpx.Client, name: str) -> None:
    """Neither fixture orders a hip injection: no cards, at once, and no call to their fhirServer
    (the quick answer comes before any prefetch is looked at)."""
    request = json.loads((CDS_HOOKS / name).read_text())
    body = checked(client.post("/cds-services/hip-injection", json=request))
    assert body == {"cards": []}


def test_order_select_without_the_hip_order_selected(client: httpx.Client) -> None:
    order = hip_order("p1")
    request = hook_request("order-select", "p1", order, None)
    request["context"]["draftOrders"]["entry"].append(
        {"resource": {"resourceType": "MedicationRequest", "id": "m1", "status": "draft"}}
    )
    request["context"]["selections"] = ["MedicationRequest/m1"]
    assert checked(client.post("/cds-services/hip-injection", json=request)) == {"cards": []}


# --- hip injections from every Synthea fixture, against gRPC -------------------------------------------


@pytest.mark.parametrize("path", sorted(SYNTHEA.glob("*.json")), ids=lambda p: p.name.split("_")[0])
@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_synthea_hip_injection_equals_grpc(
    client: httpx.Client, servers: Servers, templates: dict, path: Path, hook: str
) -> None:
    from needlepoint_client import NeedlepointClient, decision_to_dict

    patient_id, resources = synthea(path)
    order = hip_order(patient_id)
    request = hook_request(hook, patient_id, order, full_prefetch(templates, patient_id, resources))
    response = client.post("/cds-services/hip-injection", json=request)
    body = checked(response)
    assert body["cards"], "a hip injection order always gets guidance"

    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in [*resources, order]]}
    with NeedlepointClient(f"127.0.0.1:{servers.grpc.port}", timeout=30) as grpc_client:
        decision = decision_to_dict(grpc_client.evaluate_bundle(bundle, as_of=AS_OF))
    # decision ids are content-addressed (rule set, instant, prepared facts): the same id is the same decision
    assert response.headers[DECISION_HEADER] == decision["decisionId"]
    # and the cards are exactly the gRPC decision's cards
    ruleset = servers.engine.registry.get("hip-injection").ruleset
    expected = cards_from_decision(
        decision, ruleset, OrderContext(f"ServiceRequest/{order['id']}", order, patient_id),
        hook_instance=request["hookInstance"], explanation_url=f"{servers.url}/decisions/{decision['decisionId']}",
    )
    assert body["cards"] == expected
    for card in body["cards"]:
        assert card["extension"]["dev.needlepoint.decisionId"] == decision["decisionId"]
    hard = [d for d in decision.get("deferrals", ()) if d["severity"] == "HARD"]
    assert sum(
        c["indicator"] == "critical" and c["source"]["topic"]["code"] in ("deferral", "data") for c in body["cards"]
    ) == len(hard)


def test_mafalda_needs_an_inr_and_the_card_orders_it(client: httpx.Client, templates: dict) -> None:
    patient_id, resources = synthea(next(SYNTHEA.glob("Mafalda_*.json")))
    request = hook_request("order-sign", patient_id, hip_order(patient_id), full_prefetch(templates, patient_id, resources))
    cards = checked(client.post("/cds-services/hip-injection", json=request))["cards"]
    pending = next(c for c in cards if "DATA-INR-CURRENT" in c["extension"].get("dev.needlepoint.ruleIds", ()))
    assert pending["indicator"] == "critical"
    lab = pending["suggestions"][0]["actions"][0]
    assert lab["type"] == "create" and lab["resource"]["code"]["coding"][0]["code"] == "6301-6"
    # the explanation page the card links to is served, and names the rule
    page = client.get(pending["links"][0]["url"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="rule-DATA-INR-CURRENT"' in page.text and "Warfarin" in page.text


def test_modality_suggestion_switches_ultrasound_to_fluoroscopy(client: httpx.Client, templates: dict) -> None:
    patient_id, resources = synthea(next(SYNTHEA.glob("Rufus_*.json")))
    order = hip_order(patient_id, code="20611")  # the clinician chose ultrasound; the rules prefer fluoroscopy
    request = hook_request("order-sign", patient_id, order, full_prefetch(templates, patient_id, resources))
    cards = checked(client.post("/cds-services/hip-injection", json=request))["cards"]
    modality = next(c for c in cards if c["source"]["topic"]["code"] == "modality")
    if "suggestions" in modality:
        recommended = next(s for s in modality["suggestions"] if s.get("isRecommended"))
        codes = [c["code"] for c in recommended["actions"][0]["resource"]["code"]["coding"]]
        assert codes in (["20610", "77002"], ["20611"]) and recommended["actions"][0]["type"] == "update"
    else:
        assert "as ordered" in modality["summary"]


# --- prefetch: null, missing, fetched ------------------------------------------------------------------


@pytest.fixture
def fhir() -> Iterator[StandInFhir]:
    _, resources = synthea(next(SYNTHEA.glob("Mafalda_*.json")))
    server = StandInFhir(resources, page_size=2)  # small pages: searches span several
    yield server
    server.close()


def test_missing_keys_are_fetched_with_the_token(client: httpx.Client, templates: dict, fhir: StandInFhir) -> None:
    patient_id, resources = synthea(next(SYNTHEA.glob("Mafalda_*.json")))
    order = hip_order(patient_id)
    complete = hook_request("order-sign", patient_id, order, full_prefetch(templates, patient_id, resources))
    expected = client.post("/cds-services/hip-injection", json=complete)
    partial = copy.deepcopy(complete)
    for key in ("conditions", "medicationRequests", "observations-platelets", "patient"):
        del partial["prefetch"][key]
    partial["fhirServer"] = fhir.base
    partial["fhirAuthorization"] = {
        "access_token": TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "np",
    }
    response = client.post("/cds-services/hip-injection", json=partial)
    checked(response)
    assert response.headers[DECISION_HEADER] == expected.headers[DECISION_HEADER]  # the same decision
    paths = [p for p, _ in fhir.seen]
    assert {p.split("?")[0] for p in paths} == {
        f"/fhir/Patient/{patient_id}",
        "/fhir/Condition",
        "/fhir/MedicationRequest",
        "/fhir/Observation",
    }
    assert any("_page=1" in p for p in paths), "search results in pages are followed"
    assert all(auth == f"Bearer {TOKEN}" for _, auth in fhir.seen)


def test_missing_keys_without_a_fhir_server_are_412(client: httpx.Client, templates: dict) -> None:
    patient_id, resources = synthea(next(SYNTHEA.glob("Mafalda_*.json")))
    request = hook_request("order-select", patient_id, hip_order(patient_id), full_prefetch(templates, patient_id, resources))
    del request["prefetch"]["allergies"], request["prefetch"]["observations-inr"]
    issues = outcome(client.post("/cds-services/hip-injection", json=request), 412)
    assert [i["expression"] for i in issues] == [["prefetch.allergies"], ["prefetch.observations-inr"]]
    assert all("not supplied" in i["diagnostics"] for i in issues)


@pytest.mark.slow  # waits out the 3 s limit
def test_a_slow_fhir_server_is_412_within_the_time_limit(client: httpx.Client, templates: dict, fhir: StandInFhir) -> None:
    patient_id, resources = synthea(next(SYNTHEA.glob("Mafalda_*.json")))
    request = hook_request(
        "order-sign", patient_id, hip_order(patient_id), full_prefetch(templates, patient_id, resources), fhirServer=fhir.base
    )
    del request["prefetch"]["conditions"]
    fhir.delay = 6.0
    # the stand-in answers after 6 s: a 412 (not cards) shows the service gave up at its 3 s limit
    issues = outcome(client.post("/cds-services/hip-injection", json=request), 412)
    assert issues[0]["expression"] == ["prefetch.conditions"] and "within 3 s" in issues[0]["diagnostics"]


def test_fhir_server_errors_are_412(client: httpx.Client, templates: dict, fhir: StandInFhir) -> None:
    patient_id, _ = synthea(next(SYNTHEA.glob("Mafalda_*.json")))
    request = hook_request("order-sign", patient_id, hip_order(patient_id), {}, fhirServer=fhir.base.replace("/fhir", "/broken"))
    issues = outcome(client.post("/cds-services/hip-injection", json=request), 412)
    assert {tuple(i["expression"]) for i in issues} == {(f"prefetch.{k}",) for k in templates}
    assert all("HTTP 500" in i["diagnostics"] for i in issues)


def test_null_is_no_data_and_never_fetched(client: httpx.Client, templates: dict, fhir: StandInFhir) -> None:
    """Every key null: the client has no data. Nothing is fetched; the record has no Patient, and the
    decision says so rather than guessing."""
    request = hook_request("order-sign", "p-null", hip_order("p-null"), dict.fromkeys(templates), fhirServer=fhir.base)
    body = checked(client.post("/cds-services/hip-injection", json=request))
    assert fhir.seen == []
    assert body["cards"]
    # the same call with the keys absent instead: every key is fetched
    request["prefetch"] = {}
    checked(client.post("/cds-services/hip-injection", json=request))
    assert len({path for path, _ in fhir.seen if "_page=" not in path}) == len(templates)


# --- feedback ------------------------------------------------------------------------------------------


def test_feedback_is_validated_and_idempotent(client: httpx.Client, servers: Servers) -> None:
    item = {"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-01-05T10:05:31Z",
            "overrideReason": {"reason": {"system": "http://terminology.hl7.org/CodeSystem/non-adherence-reason-codes",
                                          "code": "risk-benefit-ratio", "display": "Recipient assessment of risk/benefit ratio"},
                               "userComment": "INR done this morning at the clinic"}}
    accepted = {"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "2026-01-05T10:06:00Z",
                "acceptedSuggestions": [{"id": str(uuid.uuid4())}]}
    first = client.post("/cds-services/hip-injection/feedback", json={"feedback": [item, accepted]})
    assert first.status_code == 200 and first.json() == {"stored": 2, "duplicates": 0}
    again = client.post("/cds-services/hip-injection/feedback", json={"feedback": [item]})
    assert again.json() == {"stored": 0, "duplicates": 1}
    assert sum(f.card == item["card"] for f in servers.feedback.items()) == 1
    bad = dict(accepted, card=str(uuid.uuid4()))
    del bad["acceptedSuggestions"]
    issues = outcome(client.post("/cds-services/hip-injection/feedback", json={"feedback": [bad]}), 400)
    assert "cds-fb-2" in issues[0]["diagnostics"]
    issues = outcome(client.post("/cds-services/hip-injection/feedback", json={"feedback": [dict(item, overrideReason={})]}), 400)
    assert any("cds-fb-3" in i["diagnostics"] or "empty" in i["diagnostics"] for i in issues)
    outcome(client.post("/cds-services/nope/feedback", json={"feedback": [item]}), 404)


# --- errors and the security slot ----------------------------------------------------------------------


def test_bad_requests(client: httpx.Client, templates: dict) -> None:
    outcome(client.post("/cds-services/nope", json={}), 404)
    issues = outcome(client.post("/cds-services/hip-injection", content=b"{not json"), 400)
    assert "not valid JSON" in issues[0]["diagnostics"]
    request = hook_request("order-sign", "p", hip_order("p"), {})
    request["hook"] = "patient-view"
    assert outcome(client.post("/cds-services/hip-injection", json=request), 400)[0]["expression"] == ["hook"]
    # the mapper's own errors come back naming the field
    request = hook_request("order-sign", "p", hip_order("p"), dict.fromkeys(templates) | {"conditions": "not a resource"})
    issues = outcome(client.post("/cds-services/hip-injection", json=request), 400)
    assert issues[0]["expression"] == ["prefetch.conditions"]
    assert client.get("/decisions/dec-unknown").status_code == 404


def test_authenticate_hook_guards_every_cds_route(servers: Servers) -> None:
    async def refuse_without_bearer(request) -> None:
        if not request.headers.get("authorization", "").startswith("Bearer "):
            raise Unauthorized()

    app = create_app(servers.engine, authenticate=refuse_without_bearer, clock=lambda: AS_OF)

    async def go() -> tuple[int, bytes, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://np") as http:
            refused = await http.get("/cds-services")
            allowed = await http.get("/cds-services", headers={"Authorization": "Bearer x"})
            return refused.status_code, refused.content, allowed.status_code

    assert asyncio.run(go()) == (401, b"", 200)
    with pytest.raises(ValueError, match="insecure_dev"):
        create_app(servers.engine)


# --- the command: needlepoint serve --http-port ------------------------------------------------------


@pytest.mark.slow
def test_serve_http_port_beside_grpc(server_process, unused_port, templates: dict) -> None:
    http_port = unused_port()
    server = server_process(2, "--http-port", str(http_port), "--insecure-dev")
    try:
        server.wait_for(r"serving with 2 worker\(s\)", timeout=90)
        assert len([line for line in server.lines if "CDS Hooks on http://" in line]) == 2  # both workers, one port
        patient_id, resources = synthea(next(SYNTHEA.glob("Tony_*.json")))
        request = hook_request("order-sign", patient_id, hip_order(patient_id), full_prefetch(templates, patient_id, resources))
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
            assert validate_discovery(http.get("/cds-services").json()) == []
            for _ in range(4):  # new connections: the kernel spreads them over the workers
                with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as fresh:
                    body = checked(fresh.post("/cds-services/hip-injection", json=request))
                    assert body["cards"]
    finally:
        assert server.stop() == 0, "\n".join(server.lines)


def test_serve_http_port_needs_insecure_dev(cli_command: list[str], cli_env: dict) -> None:
    result = subprocess.run(
        [*cli_command, "serve", "--http-port", "8080"], capture_output=True, text=True, env=cli_env, timeout=60, check=False
    )
    assert result.returncode == 2 and "--insecure-dev" in result.stderr


def test_a_repeated_call_is_logged_twice_and_its_cards_once(servers: Servers, templates: dict, tmp_path: Path) -> None:
    """With a decision log (in process, fixed clock): the same call twice gives the same decision and
    card uuids; both answers are 200, both decisions are rows, each card is registered once, and the
    explanation page is read back from the log."""
    from sqlalchemy import create_engine, func, select

    from needlepoint.decisionlog import DecisionLog, migrate, schema

    url = f"sqlite:///{tmp_path / 'log.sqlite3'}"
    migrate(url)
    patient_id, resources = synthea(next(SYNTHEA.glob("Mafalda_*.json")))
    request = hook_request("order-sign", patient_id, hip_order(patient_id), full_prefetch(templates, patient_id, resources))
    with DecisionLog(url) as decision_log:
        app = create_app(servers.engine, insecure_dev=True, clock=lambda: AS_OF, decision_log=decision_log)

        async def go() -> tuple[list[httpx.Response], httpx.Response]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://np") as http:
                answers = [await http.post("/cds-services/hip-injection", json=request) for _ in range(2)]
                page = await http.get(f"/decisions/{answers[0].headers[DECISION_HEADER]}")
                return answers, page

        (first, second), page = asyncio.run(go())
    assert checked(first)["cards"] == checked(second)["cards"]
    assert page.status_code == 200 and 'id="rule-DATA-INR-CURRENT"' in page.text
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(schema.decisions)).scalar_one() == 2
        assert connection.execute(select(func.count()).select_from(schema.cards)).scalar_one() == len(first.json()["cards"])
        replay = json.loads(connection.execute(select(schema.decisions.c.replay_input)).first()[0])
    engine.dispose()
    assert replay["prefetch"].keys() == request["prefetch"].keys() and replay["context"]["patientId"].startswith("masked-")


def test_a_body_over_the_limit_is_refused_while_it_streams_in(client: httpx.Client) -> None:
    """A chunked body carries no Content-Length: the service stops reading at the limit and answers
    413 rather than holding the whole body in memory first."""
    from needlepoint.cdshooks.app import MAX_BODY_BYTES

    def chunks():
        piece = b" " * (1 << 20)
        for _ in range(MAX_BODY_BYTES // len(piece) + 2):
            yield piece

    issues = outcome(
        client.post("/cds-services/hip-injection", content=chunks(), headers={"content-type": "application/json"}), 413
    )
    assert "limit" in issues[0]["diagnostics"]
