"""The CDS Hooks service as an ASGI application (Starlette), built around an Engine.

Routes:

* ``GET  /cds-services``: discovery, one service per loaded rule set for order-select and
  order-sign, prefetch templates derived from the rule set serving now;
* ``POST /cds-services/{id}``: cards for the hip injection orders in the call;
* ``POST /cds-services/{id}/feedback``: card feedback, checked and stored idempotently;
* ``GET  /decisions/{decisionId}``: the explanation page each card links to;
* ``GET  /overrides``: the overrides report by rule (``needlepoint decisions overrides``) as a page,
  when the server keeps a decision log.

Evaluation runs inline on the event loop, as the gRPC servicer does: it is short, CPU-bound and
holds the GIL in the rule engine's C code, so a thread pool would add cost and no concurrency;
a server scales with worker processes.

Security: every request except an explanation page passes an ``authenticate`` hook before any
route sees it (the spec requires the client's JWT on every call, discovery included):
:class:`~needlepoint.cdshooks.auth.JwtAuthenticator` checks the token against the exact URL of
the endpoint. A hook raises :class:`Unauthorized` to refuse; the service then answers a bare 401.
Without a hook the app refuses to start unless ``insecure_dev=True`` (``needlepoint serve
--insecure-dev``). CORS is off unless ``cors_origins`` lists the browser origins allowed (``*``
only with ``insecure_dev``, and the default there). Explanation pages (``/decisions/{id}``) are
opened by a clinician's browser from a card's link, which carries no token: the id is the
capability (32 hex digits of a SHA-256 over the rule set, the instant and the patient's facts),
and the page is sent with ``Cache-Control: no-store`` and ``Referrer-Policy: no-referrer``.
``allow_fhir_server`` is the slot for an allowlist of FHIR servers the service may call back
(the fhirServer URL comes from the caller).

Decision log: with ``decision_log``, every decision a call makes is recorded with its cards
(uuids, rule ids, override reasons) and *committed before the response is sent*, as on the gRPC
road; if the log cannot commit, the call is answered 503 rather than with unlogged cards.
Feedback then goes to the log too (committed before the 200), and explanation pages are read
from the log, so a card's link works on any worker of the server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
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
from needlepoint.cdshooks.auth import Unauthorized
from needlepoint.cdshooks.cards import EXT_RULES, OrderContext, cards_from_decision
from needlepoint.cdshooks.request import (
    RequestProblem,
    check_call,
    fetch_missing,
    missing_keys,
    record_for_order,
)
from needlepoint.cdshooks.stores import (
    DecisionStore,
    Feedback,
    FeedbackStore,
    InMemoryDecisionStore,
    InMemoryFeedbackStore,
    LogDecisionStore,
    LogFeedbackStore,
)
from needlepoint.cdshooks.validate import validate_feedback
from needlepoint.core.evaluator import Evaluator
from needlepoint.core.record import RecordError
from needlepoint.core.ruleset import RuleSet
from needlepoint.limits import LARGE_REQUEST_BYTES, MAX_CDS_HOOKS_BODY_BYTES as MAX_BODY_BYTES, declared_size
from needlepoint.server.reload import UnknownVersion
from needlepoint.server.service import Engine, collector_paused

log = logging.getLogger("needlepoint.cdshooks")

DECISION_HEADER = "X-Needlepoint-Decision-Id"
DEFAULT_FHIR_TIMEOUT = 2.0  # seconds for all fetches from fhirServer together


Authenticate = Callable[[Request], Awaitable[None]]


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def _problem(problem: RequestProblem) -> Response:
    return Response(orjson.dumps(problem.outcome()), status_code=problem.status, media_type="application/fhir+json")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


OPEN_PREFIXES = ("/decisions/",)  # explanation pages: opened from a card's link, without a token


class _AuthGate:
    """ASGI middleware: every HTTP request except the explanation pages goes through
    ``authenticate`` first (unknown paths too, so a caller without a token cannot probe which
    exist). CORS preflights never reach it: the CORS middleware outside answers them."""

    def __init__(self, app: ASGIApp, authenticate: Authenticate | None) -> None:
        self.app = app
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.authenticate is not None and scope["type"] == "http" and not scope["path"].startswith(OPEN_PREFIXES):
            try:
                await self.authenticate(Request(scope, receive))
            except Unauthorized:
                # bare: no body, no reason; the scheme is named as RFC 6750 asks, nothing more
                await Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
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
        decision_log: Any = None,
    ) -> None:
        self.engine = engine
        self.feedback_store = feedback_store
        self.decision_store = decision_store
        self.clock = clock
        self.fhir_timeout = fhir_timeout
        self.public_url = public_url.rstrip("/") if public_url else None
        self.allow_fhir_server = allow_fhir_server
        self.http_client = http_client
        self.decision_log = decision_log  # a needlepoint.decisionlog.DecisionLog, or None
        self._templates: dict[str, tuple[str, dict[str, str]]] = {}  # rule set id -> (digest, templates)

    # -- helpers

    def _evaluator(self, service_id: str) -> Evaluator:
        try:
            return self.engine.registry.get(service_id)
        except UnknownVersion:
            raise RequestProblem(404, [("not-found", f"no CDS service {service_id!r}", "")]) from None

    def templates(self, ruleset: RuleSet) -> dict[str, str]:
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
        declared = declared_size(request.headers.get("content-length"))
        if declared is not None and declared > MAX_BODY_BYTES:
            raise RequestProblem(413, [("too-costly", f"the body is {declared} bytes; the limit is {MAX_BODY_BYTES}", "")])
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # read no further than the limit, whatever the headers say
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestProblem(413, [("too-costly", f"the body is over {MAX_BODY_BYTES} bytes, the limit", "")])
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RequestProblem(
                400, [("structure", f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", "")]
            ) from None

    # -- routes

    async def discovery(self, request: Request) -> Response:
        rulesets = [self.engine.registry.get(i).ruleset for i in self.engine.ruleset_ids]
        return _json(discovery.discovery_document(rulesets))

    async def call(self, request: Request) -> Response:
        # a large call (a prefetch of a whole record) is read and evaluated with the cyclic
        # collector paused, as the gRPC road does (needlepoint.limits.LARGE_REQUEST_BYTES)
        declared = declared_size(request.headers.get("content-length"))
        with collector_paused(declared is not None and declared > LARGE_REQUEST_BYTES, declared):
            return await self._call(request)

    async def _call(self, request: Request) -> Response:
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
                if (
                    call.fhir_server is not None
                    and self.allow_fhir_server is not None
                    and not self.allow_fhir_server(call.fhir_server)
                ):
                    why = "was not supplied and fhirServer is not on this service's allowlist"
                    raise RequestProblem(412, [("forbidden", f"prefetch key {k!r} {why}", f"prefetch.{k}") for k in absent])
                started = time.perf_counter()
                prefetch.update(await fetch_missing(call, templates, absent, timeout=self.fhir_timeout, client=self.http_client))
                log.debug("fetched %d prefetch key(s) in %.1f ms", len(absent), (time.perf_counter() - started) * 1000)
            now = self.clock()
            base = self._base(request)
            cards: list[dict] = []
            decision_ids: list[str] = []
            logged: list[tuple[dict, list[dict]]] = []  # (decision, its cards) for the decision log
            for reference, resource in call.orders:
                try:
                    record = record_for_order(call, reference, prefetch, evaluator.observation_codes)
                    decision = evaluator.evaluate(record, now)
                except RecordError as exc:
                    raise RequestProblem(400, [("invalid", exc.message, exc.path)]) from None
                self.decision_store.put(decision)
                decision_ids.append(decision["decisionId"])
                order = OrderContext(reference, resource, call.patient_id, call.encounter_id)
                order_cards = cards_from_decision(
                    decision,
                    ruleset,
                    order,
                    hook_instance=call.hook_instance,
                    explanation_url=f"{base}/decisions/{decision['decisionId']}",
                )
                cards += order_cards
                logged.append((decision, order_cards))
            if self.decision_log is not None:
                # the request as evaluated: prefetch completed with what was fetched, so a replay
                # of the stored request needs no FHIR server
                await self._log(dict(call.body, prefetch=prefetch), logged, request)
        except RequestProblem as problem:
            return _problem(problem)
        return _json({"cards": cards}, headers={DECISION_HEADER: ", ".join(decision_ids)})

    async def _log(self, body: dict, decisions: list[tuple[dict, list[dict]]], request: Request) -> None:
        """Record every decision of the call with its cards, and return once all are committed:
        a card the EHR receives is a committed row. RequestProblem 503 if the log cannot commit."""
        from needlepoint.decisionlog import CardRef, DecisionEntry, LogUnavailable

        service_id = request.path_params["service_id"]
        caller = _caller(request, body)

        def entry(decision: dict, cards: list[dict]) -> DecisionEntry:
            refs = [
                CardRef(
                    c["uuid"],
                    list(c.get("extension", {}).get(EXT_RULES, ())),
                    c.get("summary", ""),
                    c.get("indicator", ""),
                    c.get("overrideReasons", ()),
                )
                for c in cards
            ]
            return DecisionEntry.cds_hooks(body, decision, caller=caller, service_id=service_id, cards=refs)

        futures = [asyncio.wrap_future(self.decision_log.record(entry(d, c))) for d, c in decisions]
        results = await asyncio.gather(*futures, return_exceptions=True)
        for (decision, cards), result in zip(decisions, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            # A client that repeats a call (same hookInstance, same record, same instant) gets the
            # same decision and the same card uuids, which the log already holds: then the
            # decision is logged again without re-registering its cards. Any other failure is a 503.
            repeated = False
            if isinstance(result, LogUnavailable) and cards:
                repeated = await asyncio.to_thread(self._cards_logged, [c["uuid"] for c in cards])
            if repeated:
                try:
                    await asyncio.wrap_future(self.decision_log.record(entry(decision, [])))
                    continue
                except LogUnavailable as again:
                    result = again
            if not isinstance(result, LogUnavailable):
                raise result
            log.error("CDS Hooks decision %s not answered: %s", decision["decisionId"], result)
            raise RequestProblem(503, [("transient", "the decision log cannot record decisions now; try again", "")])

    def _cards_logged(self, uuids: list[str]) -> bool:
        """Whether the log already holds every one of these card uuids (blocking)."""
        from sqlalchemy import func, select

        from needlepoint.decisionlog import schema

        try:
            with self.decision_log.engine.connect() as connection:
                query = select(func.count()).select_from(schema.cards).where(schema.cards.c.card_uuid.in_(uuids))
                return connection.execute(query).scalar_one() == len(set(uuids))
        except Exception:  # noqa: BLE001 - the log cannot be read (whatever the cause): the original failure, a 503, stands
            return False

    async def feedback(self, request: Request) -> Response:
        try:
            service_id = request.path_params["service_id"]
            self._evaluator(service_id)
            body = await self._body(request)
            problems = validate_feedback(body)
            if problems:
                raise RequestProblem(400, [("invalid", p.split(": ", 1)[1], p.split(": ", 1)[0]) for p in problems])
            stored = duplicates = 0
            for index, item in enumerate(body["feedback"]):
                added = self.feedback_store.add(Feedback.from_json(service_id, item))
                if inspect.isawaitable(added):  # a store that commits (the decision log): wait for it
                    added = await _stored(added, f"feedback[{index}]")
                if added:
                    stored += 1
                else:
                    duplicates += 1
        except RequestProblem as problem:
            return _problem(problem)
        return _json({"stored": stored, "duplicates": duplicates})

    async def decision_page(self, request: Request) -> Response:
        """The explanation page; the store is read in a thread (the log's is a database query)."""
        decision_id = request.path_params["decision_id"]
        headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
        decision = await asyncio.to_thread(self.decision_store.get, decision_id) if _DECISION_ID.fullmatch(decision_id) else None
        if decision is None:
            return HTMLResponse(page.render_not_found(decision_id), status_code=404, headers=headers)
        return HTMLResponse(page.render_decision(decision), headers=headers)

    async def overrides_page(self, request: Request) -> Response:
        """``needlepoint decisions overrides --format html`` as a page (``?since=`` an ISO 8601
        instant, as the command's ``--since``); 404 when the server keeps no decision log."""
        if self.decision_log is None:
            return HTMLResponse(
                "<!doctype html><title>No decision log</title><p>This server keeps no decision log.</p>", status_code=404
            )
        from needlepoint.decisionlog.report import overrides_report, render_html

        since = _instant_param(request.query_params.get("since"))
        report = await asyncio.to_thread(overrides_report, self.decision_log.engine, since=since)
        return HTMLResponse(render_html(report), headers={"Cache-Control": "no-store"})


_DECISION_ID = re.compile(r"dec-[0-9a-f]{8,64}")


def _instant_param(value: str | None) -> str | None:
    """A ``since`` query parameter as the log stores instants; None when absent or unreadable."""
    if not value:
        return None
    from needlepoint.decisionlog.entries import utc_text

    try:
        instant = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return utc_text(instant if instant.tzinfo else instant.replace(tzinfo=dt.timezone.utc))


def _caller(request: Request, body: Mapping[str, Any]) -> str:
    """Who asked, for the decision log: the token's issuer and subject when the call was
    authenticated, and the context's userId (``Practitioner/123``), which the spec requires to
    be a reference, not a name."""
    claims = getattr(request.state, "claims", None)
    parts = [claims.issuer, claims.subject or ""] if claims is not None else ["unauthenticated"]
    user = (body.get("context") or {}).get("userId") if isinstance(body.get("context"), Mapping) else None
    if isinstance(user, str) and len(user) <= 200:
        parts.append(user)
    return " ".join(p for p in parts if p)


async def _stored(pending: Awaitable[bool], path: str) -> bool:
    """The result of a committing feedback store: a spec violation it finds is a 400 naming the
    item, a log that cannot commit a 503."""
    from needlepoint.decisionlog import FeedbackError, LogUnavailable

    try:
        return await pending
    except FeedbackError as exc:
        raise RequestProblem(400, [("invalid", exc.problem, f"{path}.{exc.path.partition('.')[2]}".rstrip("."))]) from None
    except LogUnavailable:
        raise RequestProblem(503, [("transient", "the decision log cannot store feedback now; try again", "")]) from None


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
    decision_log: Any = None,
    cors_origins: Sequence[str] | None = None,
) -> Starlette:
    """The CDS Hooks ASGI app for ``engine``.

    ``authenticate`` is the security slot (see the module docstring); without it ``insecure_dev``
    must be set explicitly. ``public_url`` is the base URL clients reach the service at (for the
    explanation links; default: the request's own). ``clock`` gives the evaluation instant.
    ``decision_log`` (a :class:`needlepoint.decisionlog.DecisionLog`) records every decision
    before it is answered and, unless other stores are given, keeps feedback and serves the
    explanation pages. ``cors_origins``: the browser origins allowed (default none; ``["*"]``
    under ``insecure_dev``, and only there).
    """
    if authenticate is None and not insecure_dev:
        raise ValueError("no authenticate hook: pass one (JWT validation), or insecure_dev=True for development")
    origins = list(cors_origins) if cors_origins is not None else (["*"] if insecure_dev else [])
    if "*" in origins and not insecure_dev:
        raise ValueError("CORS origin '*' lets any web page call the service: only with insecure_dev")
    if feedback_store is None:
        feedback_store = LogFeedbackStore(decision_log) if decision_log is not None else InMemoryFeedbackStore()
    if decision_store is None:
        decision_store = LogDecisionStore(decision_log.engine) if decision_log is not None else InMemoryDecisionStore()
    service = CdsHooksService(
        engine,
        feedback_store=feedback_store,
        decision_store=decision_store,
        clock=clock,
        fhir_timeout=fhir_timeout,
        public_url=public_url,
        allow_fhir_server=allow_fhir_server,
        http_client=http_client,
        decision_log=decision_log,
    )
    middleware = [Middleware(_AuthGate, authenticate=authenticate)]
    if origins:  # outermost: preflights are answered before authentication, and 401s carry CORS headers
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=[DECISION_HEADER],
                max_age=600,
            ),
        )
    app = Starlette(
        routes=[
            Route("/cds-services", service.discovery, methods=["GET"]),
            Route("/cds-services/{service_id}", service.call, methods=["POST"]),
            Route("/cds-services/{service_id}/feedback", service.feedback, methods=["POST"]),
            Route("/decisions/{decision_id}", service.decision_page, methods=["GET"]),
            Route("/overrides", service.overrides_page, methods=["GET"]),
        ],
        middleware=middleware,
    )
    app.state.service = service
    return app
