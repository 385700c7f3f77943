"""A CDS Hooks order-select / order-sign call: checking it, finding the hip injection orders in it,
completing its prefetch, and turning it into patient records.

The steps are ordered so that the cheap answer comes first. Most orders an EHR sends through an
order hook are not hip injections; those are recognised from ``context.draftOrders`` alone (on
order-select only the selected ones), before any prefetch is looked at or fetched, and answered
``{"cards": []}``.

Prefetch keys keep the spec's three states apart:

* a key whose value is ``null``: the client has no data for it (an empty result);
* a key that is absent: the client did not supply it; we fetch it from ``fhirServer`` with the
  ``fhirAuthorization`` token, under one hard time limit for all fetches together, or, when that
  is not possible, answer 412 with an OperationOutcome naming each missing key;
* a key whose value is an OperationOutcome (or a Bundle holding one): the client tried and failed;
  the mapper reports it as a data issue, never as normal data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx

from needlepoint.core.record import INTENT_SYSTEM, TARGET_SYSTEM, ObservationCodes, PatientRecord
from needlepoint.fhir.mapper import record_from_cds_hooks_request

JSON = dict[str, Any]

CPT = "http://www.ama-assn.org/go/cpt"
SNOMED = "http://snomed.info/sct"
_HIP_SNOMED = frozenset({"24136001"})  # Hip joint structure
_HIP_ONLY_CPT = frozenset({"27093", "27095"})  # injection procedure for hip arthrography
_JOINT_CPT = frozenset({"20610", "20611"})  # major joint or bursa: hip only if the site says so
_MAX_PAGES = 20  # pages followed per prefetch search before we call it incomplete
_MAX_PARALLEL = 8  # requests in flight to one FHIR server for one call


class RequestProblem(Exception):
    """A request this service cannot act on: HTTP ``status`` with an OperationOutcome whose issues
    are (FHIR issue code, diagnostics, expression)."""

    def __init__(self, status: int, issues: Sequence[tuple[str, str, str]]):
        super().__init__("; ".join(f"{where}: {text}" for _, text, where in issues))
        self.status = status
        self.issues = list(issues)

    def outcome(self) -> JSON:
        return operation_outcome(self.issues)


def operation_outcome(issues: Sequence[tuple[str, str, str]]) -> JSON:
    """An OperationOutcome with one error issue per (code, diagnostics, expression)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": code, "diagnostics": text, **({"expression": [where]} if where else {})}
            for code, text, where in issues
        ],
    }


def _bad(where: str, text: str) -> RequestProblem:
    return RequestProblem(400, [("invalid", text, where)])


@dataclass
class HookCall:
    """The parts of a checked request that the service uses."""

    body: JSON
    hook: str
    hook_instance: str
    patient_id: str
    encounter_id: str | None
    orders: list[tuple[str, JSON]]  # (reference, ServiceRequest) of every hip injection order to evaluate
    fhir_server: str | None = None
    access_token: str | None = field(default=None, repr=False)  # transient: never logged or kept


def check_call(body: Any, hook_expected: Sequence[str]) -> HookCall:
    """The request's essentials, or RequestProblem(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise _bad("$", "a CDS Hooks request is a JSON object")
    hook = body.get("hook")
    if not isinstance(hook, str) or not hook:
        raise _bad("hook", "required: the hook that fired")
    if hook not in hook_expected:
        raise _bad("hook", f"this service answers {' and '.join(hook_expected)}, not {hook!r}")
    instance = body.get("hookInstance")
    if not isinstance(instance, str) or not instance:
        raise _bad("hookInstance", "required: a UUID for this call")
    context = body.get("context")
    if not isinstance(context, dict):
        raise _bad("context", "required: an object")
    patient_id = context.get("patientId")
    if not isinstance(patient_id, str) or not patient_id:
        raise _bad("context.patientId", "required: the patient's FHIR id")
    user_id = context.get("userId")
    if not isinstance(user_id, str) or "/" not in user_id:
        raise _bad("context.userId", "required: a Practitioner/id or PractitionerRole/id reference")
    encounter_id = context.get("encounterId")
    if encounter_id is not None and not isinstance(encounter_id, str):
        raise _bad("context.encounterId", "a string when present")
    drafts = context.get("draftOrders")
    if not isinstance(drafts, dict) or drafts.get("resourceType") != "Bundle":
        raise _bad("context.draftOrders", "required: a Bundle of the draft orders")
    selections: list[str] | None = None
    if hook == "order-select":
        raw = context.get("selections")
        if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and s for s in raw):
            raise _bad("context.selections", "required on order-select: the Type/id of each selected order")
        selections = raw
    prefetch = body.get("prefetch")
    if prefetch is not None and not isinstance(prefetch, dict):
        raise _bad("prefetch", "an object of prefetch key to resource (or null)")
    server, token = body.get("fhirServer"), None
    auth = body.get("fhirAuthorization")
    if server is not None and (not isinstance(server, str) or urlsplit(server).scheme not in ("http", "https")):
        raise _bad("fhirServer", "an http(s) base URL when present")
    if auth is not None:
        if server is None:
            raise _bad("fhirServer", "cds-r-1: required when fhirAuthorization is present")
        if not isinstance(auth, dict) or auth.get("token_type") != "Bearer" or not isinstance(auth.get("access_token"), str):
            raise _bad("fhirAuthorization", "an object with access_token and token_type Bearer")
        token = auth["access_token"]
    return HookCall(
        body=body,
        hook=hook,
        hook_instance=instance,
        patient_id=patient_id,
        encounter_id=encounter_id,
        orders=hip_injection_orders(drafts, selections),
        fhir_server=server,
        access_token=token,
    )


def _codings(concept: Any) -> list[tuple[Any, Any]]:
    if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
        return []
    return [(c.get("system"), c.get("code")) for c in concept["coding"] if isinstance(c, dict)]


def is_hip_injection(resource: Mapping[str, Any]) -> bool:
    """Whether a draft ServiceRequest is a hip injection order.

    Yes when its body site names a Needlepoint injection target (all are hip structures) or the hip
    joint (SNOMED 24136001), or its code is a hip arthrography injection (CPT 27093/27095). A
    major-joint injection code (CPT 20610/20611) or a Needlepoint injection intent is a hip
    injection only when the body site does not name some other site: with no body site at all the
    order is evaluated (and the rules ask for the target); a knee injection is not.
    """
    if resource.get("resourceType") != "ServiceRequest":
        return False
    sites = (
        [coding for concept in resource.get("bodySite") or () for coding in _codings(concept)]
        if isinstance(resource.get("bodySite"), list)
        else []
    )
    if any(system == TARGET_SYSTEM or (system == SNOMED and code in _HIP_SNOMED) for system, code in sites):
        return True
    codes = _codings(resource.get("code"))
    if any(system == CPT and code in _HIP_ONLY_CPT for system, code in codes):
        return True
    intents = (
        [c for detail in resource.get("orderDetail") or () for c in _codings(detail)]
        if isinstance(resource.get("orderDetail"), list)
        else []
    )
    looks_like_injection = any(system == CPT and code in _JOINT_CPT for system, code in codes) or any(
        system == INTENT_SYSTEM for system, _ in intents
    )
    return looks_like_injection and not sites


def hip_injection_orders(drafts: Mapping[str, Any], selections: Sequence[str] | None) -> list[tuple[str, JSON]]:
    """(reference, resource) of each hip injection ServiceRequest in ``draftOrders``: on order-select
    only those named in ``selections``, on order-sign all of them."""
    wanted = set(selections) if selections is not None else None
    found: list[tuple[str, JSON]] = []
    entries = drafts.get("entry")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "ServiceRequest":
            continue
        rid = resource.get("id")
        reference = f"ServiceRequest/{rid}" if isinstance(rid, str) and rid else None
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        if wanted is not None and reference not in wanted and full_url not in wanted:
            continue
        if is_hip_injection(resource):
            found.append((reference or full_url or f"context.draftOrders.entry[{i}]", resource))
    return found


# --- prefetch -----------------------------------------------------------------------------------


def missing_keys(call: HookCall, templates: Mapping[str, str]) -> list[str]:
    """The template keys the client did not supply (absent; a null value is supplied: no data)."""
    prefetch = call.body.get("prefetch") or {}
    return [key for key in templates if key not in prefetch]


def render_template(template: str, call: HookCall) -> str:
    """A prefetch template with its context tokens filled in (URL-encoded)."""
    query = template.replace("{{context.patientId}}", quote(call.patient_id, safe=""))
    if call.encounter_id is not None:
        query = query.replace("{{context.encounterId}}", quote(call.encounter_id, safe=""))
    user = call.body.get("context", {}).get("userId", "")
    kind, _, uid = user.partition("/")
    for token, expected in (("userPractitionerId", "Practitioner"), ("userPractitionerRoleId", "PractitionerRole")):
        if kind == expected:
            query = query.replace("{{" + token + "}}", quote(uid, safe=""))
    return query


class FhirFetchError(Exception):
    """A prefetch query the FHIR server did not answer usably (never carries the token)."""


async def fetch_missing(
    call: HookCall,
    templates: Mapping[str, str],
    keys: Sequence[str],
    *,
    timeout: float,
    client: httpx.AsyncClient | None = None,
) -> dict[str, Any]:
    """Fetch ``keys`` from the call's FHIR server, all at once, within ``timeout`` seconds in total.

    Returns {key: resource or Bundle or None}; raises RequestProblem(412) naming every key that
    could not be fetched (no fhirServer, an error status, a non-FHIR answer, or the time limit).
    A read that answers 404 is "no data" (null), like the client's own null. Searches follow
    ``next`` links (up to a bound) and are merged into one searchset Bundle.
    """
    if call.fhir_server is None:
        why = "was not supplied and the request has no fhirServer to fetch it from"
        raise RequestProblem(
            412,
            [("not-found", f"prefetch key {key!r} {why}", f"prefetch.{key}") for key in keys],
        )
    base = call.fhir_server.rstrip("/") + "/"
    headers = {"Accept": "application/fhir+json"}
    if call.access_token is not None:
        headers["Authorization"] = f"Bearer {call.access_token}"
    own = client is None
    http = client or httpx.AsyncClient(follow_redirects=False)
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    gate = asyncio.Semaphore(_MAX_PARALLEL)

    async def one(key: str) -> None:
        async with gate:
            try:
                results[key] = await _fetch(http, base, render_template(templates[key], call), headers)
            except FhirFetchError as exc:
                failures[key] = str(exc)

    tasks = [asyncio.ensure_future(one(key)) for key in keys]
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for key, task in zip(keys, tasks, strict=True):
            if task in pending:
                failures[key] = f"the FHIR server did not answer within {timeout:g} s"
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        if own:
            await http.aclose()
    if failures:
        raise RequestProblem(
            412,
            [
                ("not-found", f"prefetch key {key!r} was not supplied and could not be fetched: {failures[key]}",
                 f"prefetch.{key}")
                for key in keys
                if key in failures
            ],
        )
    return results


async def _fetch(http: httpx.AsyncClient, base: str, query: str, headers: Mapping[str, str]) -> Any:
    """One prefetch query: a read (resource or None on 404) or a search (one merged Bundle)."""
    url = urljoin(base, query)
    is_search = "?" in query or "/" not in query.split("?", maxsplit=1)[0]
    entries: list[Any] = []
    for _ in range(_MAX_PAGES):
        try:
            response = await http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise FhirFetchError(f"{type(exc).__name__} from the FHIR server") from None
        if response.status_code == 404 and not is_search:
            return None
        if response.status_code != 200:
            raise FhirFetchError(f"the FHIR server answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise FhirFetchError("the FHIR server's answer is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
            raise FhirFetchError("the FHIR server's answer is not a FHIR resource")
        if not is_search or data.get("resourceType") != "Bundle":
            return data
        entries.extend(data.get("entry") or [])
        links = [link for link in data.get("link") or () if isinstance(link, dict)]
        next_url = next((link.get("url") for link in links if link.get("relation") == "next"), None)
        if not isinstance(next_url, str):
            return {"resourceType": "Bundle", "type": "searchset", "entry": entries}
        if urlsplit(next_url).netloc != urlsplit(base).netloc:
            raise FhirFetchError("a next link points away from the FHIR server")
        url = next_url
    raise FhirFetchError(f"more than {_MAX_PAGES} pages of results")


def record_for_order(
    call: HookCall, reference: str, prefetch: Mapping[str, Any], observation_codes: ObservationCodes | None = None
) -> PatientRecord:
    """The patient record for one hip injection order: the request's draft orders and prefetch
    (with fetched keys added) through the FHIR mapper, the order chosen explicitly by reference;
    only the Observations of ``observation_codes`` (the evaluator's) are mapped, as on every road.
    Raises RecordError for input the mapper cannot read."""
    context = dict(call.body["context"])
    if reference.startswith("context."):
        context.pop("selections", None)  # an order with neither id nor fullUrl: the mapper takes the draft
    else:
        context["selections"] = [reference]  # order-sign too: the one order this evaluation is about
    body = dict(call.body)
    body["context"] = context
    body["prefetch"] = dict(prefetch)
    return record_from_cds_hooks_request(body, observation_codes=observation_codes)
