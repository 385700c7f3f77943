"""Versioned rule sets in a running server, and their safe hot reload (``serve --watch``).

A :class:`Registry` holds, per rule-set id, several loaded versions side by side and the one it
serves when a request pins none. Versions are immutable: content that changed under a version
number already loaded is rejected (bump the version), so a decision's ``(id, version)`` always
means one content, which is what replay and audit need.

The :class:`Watcher` polls a rule-sets directory. A rule set whose files changed is validated
*in a subprocess* (``python -m needlepoint.server.reload DIR``): loaded, compiled into the engine,
linted, and run against its own test cases. A subprocess keeps the server safe from what the
C engine can do with a bad rule set (loop forever holding the GIL, or crash) and keeps that work
off the request path. Only a rule set that passes is then loaded into the server and swapped in;
the swap is a single assignment on the event loop between requests (evaluation runs inline and
never yields), so no request sees half a rule set. A rejected rule set leaves the previous version
serving; the rejection is logged and reported by GetRuleset (``last_reload``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from needlepoint.core.evaluator import Evaluator
from needlepoint.rulesets import discover, load_ruleset

log = logging.getLogger("needlepoint.reload")

KEEP_VERSIONS = 3  # loaded versions kept per rule set, newest first
VALIDATION_TIMEOUT = 300.0  # seconds; a validation that takes longer is rejected


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    outcome: str  # "accepted" | "rejected"
    message: str
    at: dt.datetime
    version: str = ""
    digest: str = ""


class UnknownVersion(LookupError):
    """A rule set or a pinned version that is not loaded."""


class Registry:
    """Loaded rule sets by id and version; the serving version of each."""

    def __init__(self) -> None:
        self._versions: dict[str, OrderedDict[str, Evaluator]] = {}
        self._serving: dict[str, str] = {}
        self.last_reload: dict[str, ReloadOutcome] = {}

    def add(self, evaluator: Evaluator) -> None:
        """Load a version and serve it. Refuses new content under a version already loaded."""
        rs = evaluator.ruleset
        versions = self._versions.setdefault(rs.id, OrderedDict())
        existing = versions.get(rs.version)
        if existing is not None and existing.ruleset.digest != rs.digest:
            raise ValueError(f"{rs.id} {rs.version} is already loaded with other content ({existing.ruleset.digest}); bump the version")
        versions[rs.version] = evaluator
        versions.move_to_end(rs.version, last=False)
        self._serving[rs.id] = rs.version
        while len(versions) > KEEP_VERSIONS:
            _, retired = versions.popitem(last=True)
            retired.close()  # safe: evaluation is synchronous, nothing is mid-evaluation here

    def get(self, ruleset_id: str, version: str = "") -> Evaluator:
        versions = self._versions.get(ruleset_id)
        if not versions:
            raise UnknownVersion(f"unknown rule set {ruleset_id!r} (loaded: {', '.join(self.ids) or 'none'})")
        chosen = version or self._serving[ruleset_id]
        if chosen not in versions:
            raise UnknownVersion(f"{ruleset_id} {chosen} is not loaded (loaded: {', '.join(versions)})")
        return versions[chosen]

    @property
    def ids(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, ruleset_id: str) -> list[str]:
        return list(self._versions.get(ruleset_id, ()))

    def serving(self, ruleset_id: str) -> str:
        return self._serving[ruleset_id]

    def digest_of(self, ruleset_id: str, version: str) -> str | None:
        evaluator = self._versions.get(ruleset_id, {}).get(version)
        return evaluator.ruleset.digest if evaluator else None


def fingerprint(directory: Path) -> str:
    """A hash of every file under a rule-set directory (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def validate(directory: Path) -> dict:
    """Load, compile, lint and test a rule set; the verdict as a JSON-able dict. Runs in the
    validation subprocess (see :func:`main`)."""
    try:
        ruleset = load_ruleset(directory)
        Evaluator(ruleset).close()  # compiles into the engine
    except Exception as exc:  # anything that stops loading is a rejection, with its message
        return {"ok": False, "message": f"does not load: {exc}"}
    verdict = {"ok": True, "id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest}
    from needlepoint.authoring.lint import lint
    from needlepoint.authoring.runner import run

    errors = [f for f in lint(directory) if f.severity == "error"]
    if errors:
        first = errors[0]
        return {**verdict, "ok": False, "message": f"{len(errors)} lint error(s), first {first.file}:{first.line}:{first.column}: {first.code} {first.message}"}

    _, results, _ = run(directory)
    failed = [r for r in results if not r.passed]
    if failed:
        first = failed[0]
        return {**verdict, "ok": False, "message": f"{len(failed)} of {len(results)} test case(s) fail, first {first.case.source} {first.case.name}: {first.problems[0]}"}
    return {**verdict, "message": f"{len(results)} test cases pass"}


class Watcher:
    """Polls ``directory`` and hot-reloads changed rule sets into ``registry``."""

    def __init__(self, directory: Path, registry: Registry, interval: float = 2.0) -> None:
        self.directory = Path(directory)
        self.registry = registry
        self.interval = interval
        self._seen = {sub: fingerprint(sub) for sub in discover(self.directory)}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except Exception:  # never let the watcher die; the server keeps serving
                log.exception("rule-set watch failed")

    async def check_once(self) -> None:
        for sub in discover(self.directory):
            current = fingerprint(sub)
            if self._seen.get(sub) == current:
                continue
            self._seen[sub] = current
            await self._reload(sub)

    async def _reload(self, sub: Path) -> None:
        log.info("rule set changed on disk: %s; validating", sub)
        verdict = await _validate_in_subprocess(sub)
        now = dt.datetime.now(dt.timezone.utc)
        ruleset_id = verdict.get("id") or _id_on_disk(sub)
        if verdict["ok"]:
            known = self.registry.digest_of(ruleset_id, verdict["version"])
            if known is not None and known != verdict["digest"]:
                verdict = {**verdict, "ok": False, "message": f"version {verdict['version']} is already loaded with other content; bump the version"}
        if verdict["ok"]:
            try:
                self.registry.add(Evaluator(load_ruleset(sub)))
            except Exception as exc:
                verdict = {**verdict, "ok": False, "message": f"does not load in the server: {exc}"}
        outcome = ReloadOutcome("accepted" if verdict["ok"] else "rejected", verdict["message"], now, verdict.get("version", ""), verdict.get("digest", ""))
        self.registry.last_reload[ruleset_id] = outcome
        if verdict["ok"]:
            log.info("rule set %s %s now serving (%s)", ruleset_id, outcome.version, outcome.message)
        else:
            log.warning("rule set %s change rejected, previous version keeps serving: %s", ruleset_id, outcome.message)


def _id_on_disk(sub: Path) -> str:
    try:
        import yaml

        return str((yaml.safe_load((sub / "ruleset.yaml").read_text()) or {}).get("id") or sub.name)
    except Exception:
        return sub.name


async def _validate_in_subprocess(sub: Path) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "needlepoint.server.reload", str(sub), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), VALIDATION_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"ok": False, "message": f"validation did not finish within {VALIDATION_TIMEOUT:g}s (a rule set that hangs the engine?)"}
    if proc.returncode != 0:
        return {"ok": False, "message": f"validation crashed (exit {proc.returncode}): {err.decode(errors='replace').strip()[-300:]}"}
    return json.loads(out)


def main() -> None:
    """Validation subprocess: ``python -m needlepoint.server.reload DIR`` prints the verdict."""
    print(json.dumps(validate(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
