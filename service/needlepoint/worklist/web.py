"""The worklist page: upload (or point at) a worklist, watch it run, then sort, filter, search,
export, and open each row's explanation.

A Starlette app, mounted at ``/worklist`` in the HTTP server of ``needlepoint serve --http-port``
and run alone by ``needlepoint worklist --serve``. Routes, relative to where it is mounted:

* ``GET /``: the form (files to upload: one CSV of referrals and the Bundles it names, or Bundle
  files alone, or a Bulk Data export's NDJSON files; or, only when the operator allowed a folder,
  a path inside it), the defaults (as of, planned date, order), and the recent worklists;
* ``POST /jobs``: starts a worklist and redirects (303) to its page;
* ``GET /jobs/{job}``: progress while it runs (a ``<progress>`` polled every half second, or a
  page refresh without JavaScript), then the table (:mod:`needlepoint.worklist.html`);
* ``GET /jobs/{job}/status``: progress as JSON;
* ``GET /jobs/{job}/export.csv|.xlsx|.html``: the report, filtered like the page
  (``?status=&reason=&week=&q=``);
* ``GET /jobs/{job}/decisions/{decisionId}``: the decision's explanation, rendered by the CDS
  Hooks explanation page's renderer (:func:`needlepoint.cdshooks.page.render_decision`), from
  the worklist's own decisions.

**Jobs live on disk** (default ``<state dir>/worklists/<id>/``: the uploads, ``status.json``,
``rows.json``), because ``serve`` runs several worker processes behind one port: the process that
took the upload evaluates it (in a thread, on the batch engine's process pool) and any process
answers for progress, the table and the explanations. Job ids are random (72 bits).

**Files the server reads**: only what was uploaded, and, when ``allow_dir`` is set, files inside
that folder (a CSV's ``bundle`` paths that are not among the uploads, the folder field, the Bulk
Data export a CSV's ``patient_id`` column refers to). A path that leads outside either is an
error row for that referral, never a read.

**Security**: no authentication of its own. ``needlepoint worklist --serve`` binds loopback
only; under ``serve`` it shares the HTTP server's mode (``--insecure-dev``, loopback by default).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import posixpath
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from needlepoint.batch.evaluate import Options
from needlepoint.batch.referrals import BatchError, Plan, is_bulk_export, parse_when, plan
from needlepoint.cdshooks.page import render_decision, render_not_found
from needlepoint.core.record import INTENTS, SIDES, TARGETS
from needlepoint.core.ruleset import RuleSet
from needlepoint.limits import MAX_WORKLIST_UPLOAD_BYTES, declared_size
from needlepoint.worklist import html, run, writers
from needlepoint.worklist.rows import Reason, WorklistRow

JOB_ID_BYTES = 9
MEDIA = {"csv": "text/csv; charset=utf-8", "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
         "html": "text/html; charset=utf-8"}  # fmt: skip


def default_root() -> Path:
    """``<state dir>/worklists``: beside the decision log (``$NEEDLEPOINT_STATE_DIR``…)."""
    from needlepoint.decisionlog.database import state_dir

    return state_dir() / "worklists"


# -- rows on disk -----------------------------------------------------------------------------------


def row_to_json(row: WorklistRow) -> dict[str, Any]:
    return dataclasses.asdict(row)


def row_from_json(data: dict[str, Any]) -> WorklistRow:
    reasons = tuple(
        Reason(r["words"], r["severity"], tuple(tuple(x) for x in r["rules"]), r["planned_only"]) for r in data["reasons"]
    )
    return WorklistRow(**{**data, "reasons": reasons, "what_to_do": tuple(data["what_to_do"])})


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it stays inside ``root`` (judged on the path's text: no ``..`` out,
    not absolute), else None."""
    norm = posixpath.normpath(relative.replace("\\", "/"))
    if norm == ".." or norm.startswith(("/", "../")):
        return None
    return root / norm


class JobStore:
    """Worklist jobs under ``root``, shared by every process that serves the page."""

    def __init__(self, root: Path, ruleset: Callable[[], RuleSet], *, allow_dir: Path | None = None, jobs: int | None = None):
        self.root = root
        self.ruleset = ruleset
        self.allow_dir = allow_dir.resolve() if allow_dir is not None else None
        self.jobs = jobs
        self._cache: dict[str, tuple[float, list[WorklistRow]]] = {}
        self._lock = threading.Lock()

    # -- reading

    def folder(self, job: str) -> Path | None:
        if not job.replace("-", "").replace("_", "").isalnum() or len(job) > 40:
            return None
        path = self.root / job
        return path if (path / "status.json").is_file() else None

    def status(self, job: str) -> dict[str, Any] | None:
        folder = self.folder(job)
        return orjson.loads((folder / "status.json").read_bytes()) if folder else None

    def rows(self, job: str) -> list[WorklistRow] | None:
        """The finished job's rows (cached per process, by file time)."""
        folder = self.folder(job)
        if folder is None or not (folder / "rows.json").is_file():
            return None
        mtime = (folder / "rows.json").stat().st_mtime
        with self._lock:
            cached = self._cache.get(job)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        rows = [row_from_json(r) for r in orjson.loads((folder / "rows.json").read_bytes())]
        with self._lock:
            self._cache[job] = (mtime, rows)
            while len(self._cache) > 8:
                self._cache.pop(next(iter(self._cache)))
        return rows

    def recent(self, limit: int = 10) -> list[tuple[str, dict]]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            try:
                found.append((path.name, orjson.loads((path / "status.json").read_bytes())))
            except (OSError, orjson.JSONDecodeError):
                continue
        return sorted(found, key=lambda item: item[1].get("created", ""), reverse=True)[:limit]

    # -- starting

    def new_job(self, title: str) -> tuple[str, Path]:
        job = secrets.token_urlsafe(JOB_ID_BYTES)
        folder = self.root / job
        (folder / "input").mkdir(parents=True)
        self._status(folder, state="queued", title=title, created=_now(), done=0, total=0, rows=0, errors=0)
        return job, folder

    def _status(self, folder: Path, **fields: Any) -> None:
        path = folder / "status.json"
        current = orjson.loads(path.read_bytes()) if path.is_file() else {}
        current.update(fields)
        _write_atomic(path, orjson.dumps(current))

    def plan_uploads(self, folder: Path) -> tuple[Plan, Path | None]:
        """The plan for the files uploaded to ``folder/input`` (and the CSV, if one)."""
        inputs = folder / "input"
        csvs = sorted(p for p in inputs.iterdir() if p.suffix.lower() == ".csv")
        if len(csvs) > 1:
            raise BatchError(f"upload one CSV of referrals, not {len(csvs)}")
        if not csvs:
            return plan(inputs), None
        if is_bulk_export(inputs):
            export = inputs
        elif self.allow_dir is not None and is_bulk_export(self.allow_dir):
            export = self.allow_dir
        else:
            export = None
        return self._confined(plan(csvs[0], export=export), inputs), csvs[0]

    def plan_folder(self, relative: str) -> tuple[Plan, Path | None]:
        """The plan for a CSV or folder inside the allowed folder."""
        if self.allow_dir is None:
            raise BatchError("this server does not read folders on the server (no --allow-dir)")
        path = _inside(self.allow_dir, relative)
        if path is None:
            raise BatchError(f"{relative}: not inside the folder this server may read")
        found = plan(path, export=self.allow_dir if path.suffix.lower() == ".csv" and is_bulk_export(self.allow_dir) else None)
        return self._confined(found, self.allow_dir), (path if path.suffix.lower() == ".csv" else None)

    def _confined(self, found: Plan, base: Path) -> Plan:
        """``found`` with each Bundle path checked: inside ``base`` (the uploads), else inside the
        allowed folder at the same relative path, else the referral is an error."""
        referrals = []
        for r in found.referrals:
            if r.bundle_path is None or r.problem is not None:
                referrals.append(r)
                continue
            rel = posixpath.relpath(Path(r.bundle_path).as_posix(), base.as_posix())
            here = _inside(base, rel)
            shared = _inside(self.allow_dir, rel) if self.allow_dir is not None and here is not None else None
            if here is None:
                referrals.append(
                    dataclasses.replace(
                        r, bundle_path=None, problem=f"{r.where}: bundle {rel!r} is outside the folders this server may read"
                    )
                )
            elif not here.exists() and shared is not None and shared.exists():
                referrals.append(dataclasses.replace(r, bundle_path=str(shared)))
            else:  # an upload (or, when absent, the batch reader's own "cannot read" error row)
                referrals.append(dataclasses.replace(r, bundle_path=str(here)))
        return dataclasses.replace(found, referrals=referrals)

    def start(self, job: str, folder: Path, work: Plan, csv_path: Path | None, options: Options) -> threading.Thread:
        """Evaluate in a thread of this process (the batch engine's pool does the work)."""

        def progress(done: int, total: int, rows: int, errors: int) -> None:
            self._status(folder, state="running", done=done, total=total, rows=rows, errors=errors)

        def work_thread() -> None:
            started = time.perf_counter()
            try:
                rows = run.worklist(work, options, csv_path=csv_path, jobs=self.jobs, on_progress=progress)
                _write_atomic(folder / "rows.json", orjson.dumps([row_to_json(r) for r in rows]))
                self._status(
                    folder,
                    state="done",
                    rows=len(rows),
                    summary=html.summary(rows),
                    seconds=round(time.perf_counter() - started, 1),
                    finished=_now(),
                )
            except Exception as exc:  # noqa: BLE001 - the job fails and says why; the server goes on
                self._status(folder, state="failed", message=f"{type(exc).__name__}: {exc}", finished=_now())

        thread = threading.Thread(target=work_thread, name=f"worklist-{job}", daemon=True)
        thread.start()
        return thread


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _safe_name(name: str) -> str:
    """An uploaded file's name without any folder part and with only plain characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    clean = "".join(ch if ch.isalnum() or ch in "._- " else "_" for ch in base).strip(" .")
    return clean or "upload"


# -- pages ----------------------------------------------------------------------------------------------


class WorklistPages:
    """The routes, around a :class:`JobStore`."""

    def __init__(self, store: JobStore):
        self.store = store

    @staticmethod
    def _base(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def _page(self, title: str, body: str, request: Request, *, script: bool = True, extra: str = "") -> HTMLResponse:
        nav = f'<nav aria-label="Worklist"><a href="{html.e(self._base(request))}/">All worklists and upload</a></nav>'
        return HTMLResponse(html.document(title, nav + body + extra, script=script), headers={"Cache-Control": "no-store"})

    async def index(self, request: Request) -> Response:
        base = html.e(self._base(request))
        folder = ""
        if self.store.allow_dir is not None:
            folder = ('<p><label for="folder">Or a CSV or folder on the server (inside the allowed folder)'
                      '<input id="folder" name="folder" type="text" size="40"></label></p>')  # fmt: skip

        def choice(name: str, values: tuple[str, ...]) -> str:
            opts = "".join(f'<option value="{html.e(v)}">{html.e(v)}</option>' for v in values)
            return (f'<label for="{name}">{name.capitalize()}<select id="{name}" name="{name}">'
                    f'<option value="">each referral\'s own</option>{opts}</select></label>')

        recent = "".join(
            f'<li><a href="{base}/jobs/{html.e(job)}">{html.e(s.get("title", job))}</a>, {html.e(s.get("created", ""))}: '
            f'{html.e(s.get("summary") or s.get("state", ""))}</li>'
            for job, s in self.store.recent()
        )
        body = (
            "<h1>Worklist</h1><p>Upload a CSV of referrals "
            "(columns: referral_id, patient_name, patient_id or bundle, target, side, intent, planned_date, as_of) "
            "with the Bundle files it names, or Bundle files alone (each carrying its own order), "
            "or a Bulk Data export's NDJSON files.</p>"
            f'<form method="post" action="{base}/jobs" enctype="multipart/form-data">'
            '<p><label for="files">Files'
            '<input id="files" name="files" type="file" multiple accept=".csv,.json,.ndjson"></label></p>'
            f"{folder}"
            '<div class="filters"><label for="as_of">As of (ISO 8601; empty: now)'
            '<input id="as_of" name="as_of" type="text" placeholder="2025-06-02T09:00:00Z"></label>'
            '<label for="planned">Planned date for referrals without one<input id="planned" name="planned" type="date"></label>'
            f"{choice('target', TARGETS)}{choice('side', SIDES)}{choice('intent', INTENTS)}</div>"
            "<p>A target, side or intent picked here overrides every uploaded referral's own "
            "(a CSV row's own value still wins); leave each referral's own to keep theirs.</p>"
            '<p><button type="submit">Evaluate the worklist</button></p></form>'
            f"<h2>Recent worklists</h2><ul>{recent or '<li>None yet.</li>'}</ul>"
        )
        return self._page("Needlepoint worklist", body, request, script=False)

    async def create(self, request: Request) -> Response:
        declared = declared_size(request.headers.get("content-length"))
        if declared is not None and declared > MAX_WORKLIST_UPLOAD_BYTES:
            return self._error(request, f"the upload is {declared} bytes; the limit is {MAX_WORKLIST_UPLOAD_BYTES}", 413)
        async with request.form(max_files=10000, max_fields=100) as form:
            try:
                as_of = parse_when(str(form.get("as_of") or ""), "as of", end_of_day=False) if form.get("as_of") else None
                planned = parse_when(str(form.get("planned")), "planned date", end_of_day=True) if form.get("planned") else None
            except ValueError as exc:
                return self._error(request, str(exc), 400)
            order = tuple(
                (str(form.get(k)) if form.get(k) in allowed else None)
                for k, allowed in (("target", TARGETS), ("side", SIDES), ("intent", INTENTS))
            )
            uploads = [(f.filename, f) for f in form.getlist("files") if isinstance(f, UploadFile) and f.filename]
            folder_field = str(form.get("folder") or "").strip()
            title = folder_field or ", ".join(_safe_name(name) for name, _ in uploads[:3]) + (" …" if len(uploads) > 3 else "")
            if not uploads and not folder_field:
                return self._error(request, "choose files to upload (or a folder on the server)", 400)
            job, folder = self.store.new_job(title or "worklist")
            for name, upload in uploads:
                (folder / "input" / _safe_name(name)).write_bytes(await upload.read())
        try:
            work, csv_path = self.store.plan_folder(folder_field) if folder_field else self.store.plan_uploads(folder)
        except BatchError as exc:
            self.store._status(folder, state="failed", message=str(exc), finished=_now())
            return RedirectResponse(f"{self._base(request)}/jobs/{job}", status_code=303)
        ruleset = self.store.ruleset()
        options = Options(ruleset=ruleset, as_of=as_of or dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
                          planned=planned, order=order if any(order) else None)  # type: ignore[arg-type]  # fmt: skip
        self.store.start(job, folder, work, csv_path, options)
        return RedirectResponse(f"{self._base(request)}/jobs/{job}", status_code=303)

    def _error(self, request: Request, message: str, code: int) -> HTMLResponse:
        response = self._page(
            "Worklist: cannot start",
            f'<h1>Cannot start the worklist</h1><p role="alert">{html.e(message)}</p>',
            request,
            script=False,
        )
        response.status_code = code
        return response

    async def status(self, request: Request) -> Response:
        status = self.store.status(request.path_params["job"])
        if status is None:
            return JSONResponse({"error": "no such worklist"}, status_code=404)
        return JSONResponse(status, headers={"Cache-Control": "no-store"})

    async def job(self, request: Request) -> Response:
        job = request.path_params["job"]
        status = self.store.status(job)
        if status is None:
            return self._error(request, "no such worklist (it may have been removed)", 404)
        base = self._base(request)
        title = f"Worklist: {status.get('title', job)}"
        if status.get("state") == "failed":
            return self._page(
                title,
                f'<h1>{html.e(title)}</h1><p role="alert">This worklist could not run: {html.e(status.get("message", ""))}</p>',
                request,
                script=False,
            )
        rows = self.store.rows(job) if status.get("state") == "done" else None
        if rows is None:
            done, total = status.get("done", 0), max(status.get("total", 0), 1)
            body = (
                f'<h1>{html.e(title)}</h1><p><label for="progress">Evaluating the referrals</label><br>'
                f'<progress id="progress" max="{total}" value="{done}">{done * 100 // total} %</progress></p>'
                f'<p id="progress-text" role="status" aria-live="polite">{status.get("rows", 0)} referrals evaluated so far.</p>'
                '<noscript><meta http-equiv="refresh" content="2"></noscript>'
            )
            status_url = orjson.dumps(f"{base}/jobs/{job}/status").decode()
            poll = (
                "<script>(function(){var p=document.getElementById('progress'),t=document.getElementById('progress-text');"
                f"function tick(){{fetch({status_url},{{cache:'no-store'}})"
                ".then(function(r){return r.json();}).then(function(s){"
                "if(s.state==='done'||s.state==='failed'){location.reload();return;}"
                "p.max=Math.max(s.total,1);p.value=s.done;"
                "t.textContent=s.rows+' referrals evaluated so far'+(s.errors?', '+s.errors+' cannot be evaluated':'')+'.';"
                "setTimeout(tick,500);}).catch(function(){setTimeout(tick,1000);});}setTimeout(tick,300);})();</script>"
            )
            return self._page(title, body, request, script=False, extra=poll)
        exports = "".join(
            f'<a data-export="{html.e(f"{base}/jobs/{job}/export.{fmt}")}" '
            f'href="{html.e(f"{base}/jobs/{job}/export.{fmt}")}" download>{label}</a> '
            for fmt, label in (("csv", "CSV"), ("xlsx", "Excel (XLSX)"), ("html", "HTML report"))
        )
        body = (
            f'<h1>{html.e(title)}</h1><p>{html.e(html.summary(rows))}. Evaluated in {html.e(status.get("seconds", ""))} s.</p>'
            "<p><strong>Suggestions with reasons, never orders. The rule set is not clinically validated.</strong></p>"
            + html.legend()
            + html.filters(rows)
            + f'<p>Export the rows shown: {exports}</p>'
            + html.table(rows, lambda i, r: f"{base}/jobs/{job}/decisions/{r.decision_id}" if r.decision_id else None)
        )
        return self._page(title, body, request)

    async def export(self, request: Request) -> Response:
        job, fmt = request.path_params["job"], request.path_params["fmt"]
        rows = self.store.rows(job)
        if rows is None or fmt not in MEDIA:
            return Response("no such worklist or format", status_code=404, media_type="text/plain")
        q = request.query_params
        shown = [r for r in rows if html.matches(r, q.get("status", ""), q.get("reason", ""), q.get("week", ""), q.get("q", ""))]
        origin = str(request.base_url).rstrip("/")
        link = lambda r: f"{origin}{self._base(request)}/jobs/{job}/decisions/{r.decision_id}" if r.decision_id else None  # noqa: E731
        if fmt == "csv":
            data = writers.csv_bytes(shown, link)
        elif fmt == "xlsx":
            data = writers.xlsx_bytes(shown, link)
        else:
            data = writers.html_report(shown).encode("utf-8")
        return Response(
            data,
            media_type=MEDIA[fmt],
            headers={"Content-Disposition": f'attachment; filename="worklist-{job}.{fmt}"', "Cache-Control": "no-store"},
        )

    async def decision(self, request: Request) -> Response:
        job, decision_id = request.path_params["job"], request.path_params["decision_id"]
        for row in self.store.rows(job) or ():
            if decision_id in row.decisions:
                page = render_decision(row.decisions[decision_id])
                back = f'<body><p><a href="{html.e(self._base(request))}/jobs/{html.e(job)}">Back to the worklist</a></p>'
                return HTMLResponse(page.replace("<body>", back, 1), headers={"Cache-Control": "no-store"})
        return HTMLResponse(render_not_found(decision_id), status_code=404)


def create_worklist_app(store: JobStore) -> Starlette:
    """The worklist page's ASGI app around ``store`` (mount it anywhere: links follow the mount)."""
    pages = WorklistPages(store)
    app = Starlette(
        routes=[
            Route("/", pages.index, methods=["GET"]),
            Route("/jobs", pages.create, methods=["POST"]),
            Route("/jobs/{job}", pages.job, methods=["GET"]),
            Route("/jobs/{job}/status", pages.status, methods=["GET"]),
            Route("/jobs/{job}/export.{fmt}", pages.export, methods=["GET"]),
            Route("/jobs/{job}/decisions/{decision_id}", pages.decision, methods=["GET"]),
        ]
    )
    app.state.store = store
    return app


def worklist_mount(engine: Any, allow_dir: Path | None = None) -> Any:
    """The page as a Starlette ``Mount`` at ``/worklist`` for the HTTP server of ``needlepoint
    serve``: worklists are evaluated with the default rule set's version serving at the time."""
    from starlette.routing import Mount

    from needlepoint.rulesets import DEFAULT_RULESET

    store = JobStore(default_root(), lambda: engine.registry.get(DEFAULT_RULESET).ruleset, allow_dir=allow_dir)
    return Mount("/worklist", create_worklist_app(store))
