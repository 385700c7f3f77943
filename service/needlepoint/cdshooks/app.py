"""The CDS Hooks service as an ASGI application (Starlette), built around an Engine.

Routes:

* ``GET  /cds-services``: discovery, one service per loaded rule set for order-select and
  order-sign, prefetch templates derived from the rule set serving now;
* ``POST /cds-services/{id}``: cards for the hip injection orders in the call;
* ``POST /cds-services/{id}/feedback``: card feedback, checked and stored idempotently;
* ``GET  /decisions/{decisionId}``: the explanation page each card links to.

Evaluation runs inline on the event loop, as the gRPC servicer does: it is short, CPU-bound and
holds the GIL in the rule engine's C code, so a thread pool would add cost and no concurrency;
a server scales with worker processes.

Security: every request to ``/cds-services`` passes an ``authenticate`` hook before any route
sees it (the spec requires the client's JWT on every call, discovery included). The JWT
validator from the security package plugs in there: an async callable that receives the
Starlette Request and raises :class:`Unauthorized` to refuse; the service then answers a bare
401. Without a hook the app refuses to start unless ``insecure_dev=True`` (the current mode,
``needlepoint serve --insecure-dev``), which also opens CORS for browser-based test clients.
``allow_fhir_server`` is the matching slot for an allowlist of FHIR servers the service may
call back (the fhirServer URL comes from the caller).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from needlepoint.cdshooks import discovery, page
from needlepoint.cdshooks.cards import OrderContext, cards_from_decision
from needlepoint.cdshooks.request import (
    RequestProblem,
    check_call,
    fetch_missing,
    missing_keys,
    operation_outcome,
    record_for_order,
)
from needlepoint.cdshooks.stores import DecisionStore, Feedback, FeedbackStore, InMemoryDecisionStore, InMemoryFeedbackStore
from needlepoint.cdshooks.validate import validate_feedback
from needlepoint.core.record import RecordError
from needlepoint.server.engine import Engine
from needlepoint.server.reload import UnknownVersion

log = logging.getLogger("needlepoint.cdshooks")

DECISION_HEADER = "X-Needlepoint-Decision-Id"
MAX_BODY_BYTES = 16 * 1024 * 1024  # a 8 MB bundle limit (gRPC) plus room for JSON overhead
DEFAULT_FHIR_TIMEOUT = 2.0  # seconds for all fetches from fhirServer together


class Unauthorized(Exception):
    """Raised by an ``authenticate`` hook to refuse a request (answered with a bare 401)."""


Authenticate = Callable[[Request], Awaitable[None]]


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def _problem(problem: RequestProblem) -> Response:
    return Response(orjson.dumps(problem.outcome()), status_code=problem.status, media_type="application/fhir+json")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class _AuthGate:
    """ASGI middleware: every HTTP request under /cds-services goes through ``authenticate`` first."""

    def __init__(self, app: ASGIApp, authenticate: Authenticate | None) -> None:
        self.app = app
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.authenticate is not None and scope["type"] == "http" and scope["path"].startswith("/cds-services"):
            try:
                await self.authenticate(Request(scope, receive))
            except Unauthorized:
                await Response(status_code=401)(scope, receive, send)  # bare: no detail for a refused caller
                return
        await self.app(scope, receive, send)


class CdsHooksService:
    """The handlers, with what they share: the engine, the stores, the clock, the settings."""

    def __init__(
        self,
        engine: Engine,
        *,
        feedback_store: FeedbackStore,
        decision_store: DecisionStore,
        clock: Callable[[], dt.datetime],
        fhir_timeout: float,
        public_url: str | None,
        allow_fhir_server: Callable[[str], bool] | None,
        http_client: httpx.AsyncClient | None,
    ) -> None:
        self.engine = engine
        self.feedback_store = feedback_store
        self.decision_store = decision_store
        self.clock = clock
        self.fhir_timeout = fhir_timeout
        self.public_url = public_url.rstrip("/") if public_url else None
        self.allow_fhir_server = allow_fhir_server
        self.http_client = http_client
        self._templates: dict[str, tuple[str, dict[str, str]]] = {}  # rule set id -> (digest, templates)

    # -- helpers

    def _evaluator(self, service_id: str):
        try:
            return self.engine.registry.get(service_id)
        except UnknownVersion:
            raise RequestProblem(404, [("not-found", f"no CDS service {service_id!r}", "")]) from None

    def templates(self, ruleset) -> dict[str, str]:
        """The prefetch templates of the rule set serving now (recomputed when it is reloaded)."""
        cached = self._templates.get(ruleset.id)
        if cached is None or cached[0] != ruleset.digest:
            cached = (ruleset.digest, discovery.prefetch_templates(ruleset))
            self._templates[ruleset.id] = cached
        return cached[1]

    def _base(self, request: Request) -> str:
        return self.public_url or str(request.base_url).rstrip("/")

    @staticmethod
    async def _body(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise RequestProblem(413, [("too-costly", f"the body is {declared} bytes; the limit is {MAX_BODY_BYTES}", "")])
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestProblem(413, [("too-costly", f"the body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}", "")])
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RequestProblem(400, [("structure", f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", "")]) from None

    # -- routes

    async def discovery(self, request: Request) -> Response:
        rulesets = [self.engine.registry.get(i).ruleset for i in self.engine.ruleset_ids]
        return _json(discovery.discovery_document(rulesets))

    async def call(self, request: Request) -> Response:
        try:
            evaluator = self._evaluator(request.path_params["service_id"])
            call = check_call(await self._body(request), discovery.HOOKS)
            if not call.orders:
                return _json({"cards": []})  # not a hip injection: the quick answer
            ruleset = evaluator.ruleset
            templates = self.templates(ruleset)
            prefetch = dict(call.body.get("prefetch") or {})
            absent = missing_keys(call, templates)
            if absent:
                if call.fhir_server is not None and self.allow_fhir_server is not None and not self.allow_fhir_server(call.fhir_server):
                    raise RequestProblem(412, [("forbidden", f"prefetch key {k!r} was not supplied and fhirServer is not on this service's allowlist", f"prefetch.{k}") for k in absent])
                started = time.perf_counter()
                prefetch.update(await fetch_missing(call, templates, absent, timeout=self.fhir_timeout, client=self.http_client))
                log.debug("fetched %d prefetch key(s) in %.1f ms", len(absent), (time.perf_counter() - started) * 1000)
            now = self.clock()
            base = self._base(request)
            cards: list[dict] = []
            decision_ids: list[str] = []
            for reference, resource in call.orders:
                try:
                    record = record_for_order(call, reference, prefetch)
                    decision = evaluator.evaluate(record, now)
                except RecordError as exc:
                    raise RequestProblem(400, [("invalid", exc.message, exc.path)]) from None
                self.decision_store.put(decision)
                decision_ids.append(decision["decisionId"])
                order = OrderContext(reference, resource, call.patient_id, call.encounter_id)
                cards += cards_from_decision(
                    decision,
                    ruleset,
                    order,
                    hook_instance=call.hook_instance,
                    explanation_url=f"{base}/decisions/{decision['decisionId']}",
                )
        except RequestProblem as problem:
            return _problem(problem)
        return _json({"cards": cards}, headers={DECISION_HEADER: ", ".join(decision_ids)})

    async def feedback(self, request: Request) -> Response:
        try:
            service_id = request.path_params["service_id"]
            self._evaluator(service_id)
            body = await self._body(request)
            problems = validate_feedback(body)
            if problems:
                raise RequestProblem(400, [("invalid", p.split(": ", 1)[1], p.split(": ", 1)[0]) for p in problems])
            stored = duplicates = 0
            for item in body["feedback"]:
                if self.feedback_store.add(Feedback.from_json(service_id, item)):
                    stored += 1
                else:
                    duplicates += 1
        except RequestProblem as problem:
            return _problem(problem)
        return _json({"stored": stored, "duplicates": duplicates})

    async def decision_page(self, request: Request) -> Response:
        decision_id = request.path_params["decision_id"]
        decision = self.decision_store.get(decision_id)
        if decision is None:
            return HTMLResponse(page.render_not_found(decision_id), status_code=404)
        return HTMLResponse(page.render_decision(decision), headers={"Cache-Control": "no-store"})


def create_app(
    engine: Engine,
    *,
    insecure_dev: bool = False,
    authenticate: Authenticate | None = None,
    feedback_store: FeedbackStore | None = None,
    decision_store: DecisionStore | None = None,
    clock: Callable[[], dt.datetime] = _utcnow,
    fhir_timeout: float = DEFAULT_FHIR_TIMEOUT,
    public_url: str | None = None,
    allow_fhir_server: Callable[[str], bool] | None = None,
    http_client: httpx.AsyncClient | None = None,
) -> Starlette:
    """The CDS Hooks ASGI app for ``engine``.

    ``authenticate`` is the security slot (see the module docstring); without it ``insecure_dev``
    must be set explicitly. ``public_url`` is the base URL clients reach the service at (for the
    explanation links; default: the request's own). ``clock`` gives the evaluation instant.
    """
    if authenticate is None and not insecure_dev:
        raise ValueError("no authenticate hook: pass one (JWT validation), or insecure_dev=True for development")
    service = CdsHooksService(
        engine,
        feedback_store=feedback_store if feedback_store is not None else InMemoryFeedbackStore(),
        decision_store=decision_store if decision_store is not None else InMemoryDecisionStore(),
        clock=clock,
        fhir_timeout=fhir_timeout,
        public_url=public_url,
        allow_fhir_server=allow_fhir_server,
        http_client=http_client,
    )
    middleware = [Middleware(_AuthGate, authenticate=authenticate)]
    if insecure_dev:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(
        routes=[
            Route("/cds-services", service.discovery, methods=["GET"]),
            Route("/cds-services/{service_id}", service.call, methods=["POST"]),
            Route("/cds-services/{service_id}/feedback", service.feedback, methods=["POST"]),
            Route("/decisions/{decision_id}", service.decision_page, methods=["GET"]),
        ],
        middleware=middleware,
    )
    app.state.service = service
    return app
