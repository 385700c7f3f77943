"""Versioned rule sets in a running server, and a hot reload that cannot fail open (``serve --watch``).

A :class:`Registry` holds, per rule-set id, several loaded versions side by side and the one it
serves when a request pins none. Versions are immutable: content that changed under a version
number already loaded is rejected (bump the version), so a decision's ``(id, version)`` always
means one content, which is what replay and audit need.

What is validated is what is served. A rule-set directory is read once into a :class:`Snapshot`
(every file's bytes, and a digest of them). The validation subprocess gets that snapshot, writes
it into a private temporary directory, checks the digest of what it wrote, then loads, compiles,
lints and runs the rule set's own cases there and checks the digest again. Only the documents
parsed from that snapshot travel on (:class:`Accepted`), and a worker builds its evaluator from
them and checks that the rule-set digest is the validated one. Nothing re-reads the directory after
validation, so a file saved meanwhile is simply the next change, validated on its own.

One :class:`Watcher` runs per server, in the supervisor (a thread: the validation subprocess
blocks it, never the supervisor's loop, and no worker parses YAML). The supervisor keeps the
accepted versions in a :class:`Catalog`, sends it to the workers, and starts replacement workers
from it, so every worker serves the same validated versions with the same pins.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import pickle
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from needlepoint.core.evaluator import Evaluator
from needlepoint.rulesets import build_ruleset, discover, load

log = logging.getLogger("needlepoint.reload")

KEEP_VERSIONS = 3  # loaded versions kept per rule set, newest first
VALIDATION_TIMEOUT = 300.0  # seconds; a validation that takes longer is rejected


@dataclass(frozen=True)
class ReloadOutcome:
    """The verdict on the last change of a rule set seen on disk (GetRuleset ``last_reload``)."""

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
            raise ValueError(
                f"{rs.id} {rs.version} is already loaded with other content ({existing.ruleset.digest}); bump the version"
            )
        versions[rs.version] = evaluator
        versions.move_to_end(rs.version, last=False)
        self._serving[rs.id] = rs.version
        while len(versions) > KEEP_VERSIONS:
            _, retired = versions.popitem(last=True)
            retired.close()  # safe: evaluation is synchronous, nothing is mid-evaluation here

    def install(self, versions: Mapping[str, Sequence[Evaluator]], last_reload: Mapping[str, ReloadOutcome]) -> None:
        """Replace every loaded version at once: per id, the evaluators newest (serving) first.
        Evaluators no longer listed are closed. Called on the event loop between requests, so no
        request sees a mix of the old and the new set."""
        kept = {id(e) for evaluators in versions.values() for e in evaluators}
        retired = [e for vs in self._versions.values() for e in vs.values() if id(e) not in kept]
        self._versions = {i: OrderedDict((e.ruleset.version, e) for e in evs) for i, evs in versions.items() if evs}
        self._serving = {i: next(iter(vs)) for i, vs in self._versions.items()}
        self.last_reload = dict(last_reload)
        for evaluator in retired:
            evaluator.close()

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
        versions = self._versions.get(ruleset_id)
        evaluator = versions.get(version) if versions is not None else None
        return evaluator.ruleset.digest if evaluator else None


# -- snapshots -----------------------------------------------------------------------------------


def files_digest(files: Mapping[str, bytes]) -> str:
    """``sha256:`` over every file's relative name and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(b"\0")
        h.update(hashlib.sha256(files[name]).digest())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """Every file of one rule-set directory, read once, with the digest of exactly those bytes."""

    source: str
    files: dict[str, bytes]
    digest: str

    @classmethod
    def read(cls, directory: Path) -> Snapshot:
        """Read the directory's files (each once). A file that vanishes while being read is left
        out: the snapshot is then whatever was there, and validation judges that."""
        directory = Path(directory)
        files: dict[str, bytes] = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            try:
                files[path.relative_to(directory).as_posix()] = path.read_bytes()
            except FileNotFoundError:
                continue
        return cls(str(directory), files, files_digest(files))

    def write(self, target: Path) -> Path:
        """Write the snapshot's files under ``target`` and check that what is there now has the
        snapshot's digest (the compare step of snapshot, digest, compare)."""
        target = Path(target)
        for name, data in self.files.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        written = Snapshot.read(target).digest
        if written != self.digest:
            raise RuntimeError(f"snapshot of {self.source} changed when written out ({written} != {self.digest})")
        return target


def fingerprint(directory: Path) -> str:
    """The snapshot digest of a directory as it is now."""
    return Snapshot.read(directory).digest


@dataclass(frozen=True)
class Accepted:
    """One validated (or, at start-up, loaded) version of a rule set: the documents parsed from
    the snapshot with ``files_digest``, which build the rule set with ``digest``."""

    ruleset_id: str
    version: str
    digest: str
    files_digest: str
    documents: dict[str, Any] = field(repr=False)
    source: str = ""

    def evaluator(self) -> Evaluator:
        """Build and compile this version, refusing documents that do not give the validated digest."""
        ruleset = build_ruleset(self.documents)
        if ruleset.digest != self.digest:
            raise RuntimeError(
                f"{self.ruleset_id} {self.version}: built digest {ruleset.digest} is not the validated {self.digest}"
            )
        return Evaluator(ruleset)


def parse_snapshot(snapshot: Snapshot) -> Accepted:
    """Parse a snapshot (in a private copy, never the watched directory) into an :class:`Accepted`.
    Raises what loading raises, naming files under the snapshot's source directory."""
    with tempfile.TemporaryDirectory(prefix="needlepoint-snapshot-") as tmp:
        directory = snapshot.write(Path(tmp) / "ruleset")
        loaded = load(directory, shown=snapshot.source)
    ruleset = loaded.ruleset
    return Accepted(ruleset.id, ruleset.version, ruleset.digest, snapshot.digest, loaded.documents, snapshot.source)


def validate_snapshot(snapshot: Snapshot) -> dict[str, Any]:
    """Load, compile, lint and test the rule set in a snapshot (the front end's
    :func:`~needlepoint.authoring.validation.validate_ruleset`, in a private copy, with files named
    under the snapshot's source); the verdict as a dict, with the :class:`Accepted` under
    ``accepted`` when it passes. Runs in the validation subprocess."""
    from needlepoint.authoring.validation import validate_ruleset

    with tempfile.TemporaryDirectory(prefix="needlepoint-validate-") as tmp:
        try:
            directory = snapshot.write(Path(tmp) / "ruleset")
        except Exception as exc:  # noqa: BLE001 - whatever stops the files loading is the verdict
            return {"ok": False, "message": f"does not load: {exc}", "files_digest": snapshot.digest}
        result = validate_ruleset(directory, shown=snapshot.source)
        ruleset = result.ruleset
        if ruleset is None:
            return {"ok": False, "message": result.message, "files_digest": snapshot.digest}
        verdict = {"ok": True, "id": ruleset.id, "version": ruleset.version, "digest": ruleset.digest,
                   "files_digest": snapshot.digest}
        if not result.ok:
            return {**verdict, "ok": False, "message": result.message}
        if Snapshot.read(directory).digest != snapshot.digest:  # nothing may touch the private copy
            return {**verdict, "ok": False, "message": "the validated copy changed during validation"}
        accepted = Accepted(ruleset.id, ruleset.version, ruleset.digest, snapshot.digest, result.documents, snapshot.source)
        return {**verdict, "message": result.message, "accepted": accepted}


def validate(directory: Path) -> dict[str, Any]:
    """Validate a directory as it is now (a snapshot of it); the verdict."""
    return validate_snapshot(Snapshot.read(directory))


def validate_in_subprocess(
    snapshot: Snapshot, timeout: float = VALIDATION_TIMEOUT, started: Callable[[subprocess.Popen], None] | None = None
) -> dict[str, Any]:
    """:func:`validate_snapshot` in ``python -m needlepoint.server.reload``: the snapshot goes in on
    standard input, the verdict comes back on standard output. A crash or a hang (the C engine can
    do both with a bad rule set) is a rejection, never a fault of the server. ``started`` gets the
    process (so that whoever stops the watcher can kill it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "needlepoint.server.reload"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if started is not None:
        started(proc)
    try:
        out, err = proc.communicate(pickle.dumps(snapshot), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "message": f"validation did not finish within {timeout:g}s (a rule set that hangs the engine?)"}
    if proc.returncode != 0:
        return {
            "ok": False,
            "message": f"validation crashed (exit {proc.returncode}): {err.decode(errors='replace').strip()[-300:]}",
        }
    verdict = pickle.loads(out)
    accepted = verdict.get("accepted")
    if verdict["ok"] and (accepted is None or accepted.files_digest != snapshot.digest):
        return {**verdict, "ok": False, "message": "validation judged other bytes than the snapshot"}
    return verdict


# -- what the supervisor keeps and hands to workers ------------------------------------------------


@dataclass
class Catalog:
    """The accepted versions of every rule set, newest (serving) first, and the last reload outcome
    of each. Picklable: the supervisor sends it to workers, which install exactly this."""

    versions: dict[str, list[Accepted]] = field(default_factory=dict)
    last_reload: dict[str, ReloadOutcome] = field(default_factory=dict)
    generation: int = 0

    def conflict(self, accepted: Accepted) -> str | None:
        """Why ``accepted`` cannot be added (new content under a version already loaded), or None."""
        for known in self.versions.get(accepted.ruleset_id, ()):
            if known.version == accepted.version and known.digest != accepted.digest:
                return f"version {accepted.version} is already loaded with other content; bump the version"
        return None

    def add(self, accepted: Accepted) -> None:
        """Serve ``accepted``; keep the previous versions for pinning, at most KEEP_VERSIONS."""
        problem = self.conflict(accepted)
        if problem:
            raise ValueError(problem)
        kept = [a for a in self.versions.get(accepted.ruleset_id, ()) if a.version != accepted.version]
        self.versions[accepted.ruleset_id] = [accepted, *kept][:KEEP_VERSIONS]
        self.generation += 1

    def record(self, ruleset_id: str, outcome: ReloadOutcome) -> None:
        self.last_reload[ruleset_id] = outcome
        self.generation += 1

    def serving(self, ruleset_id: str) -> Accepted:
        return self.versions[ruleset_id][0]


def load_catalog(directory: Path) -> tuple[Catalog, dict[Path, str]]:
    """The catalog at start-up: every rule set under ``directory``, snapshotted and parsed once
    (loaded, not tested: a server starts with what it is given). Also the snapshot digest of each
    directory, the watcher's baseline, so the first change seen is a change from what is served."""
    catalog, seen = Catalog(), {}
    for sub in discover(directory):
        snapshot = Snapshot.read(sub)
        accepted = parse_snapshot(snapshot)
        if accepted.ruleset_id in catalog.versions:
            raise ValueError(f"{sub}: rule set id {accepted.ruleset_id!r} is loaded twice")
        catalog.add(accepted)
        seen[sub] = snapshot.digest
        log.info("loaded rule set %s %s (%s) from %s", accepted.ruleset_id, accepted.version, accepted.digest, sub)
    if not catalog.versions:
        raise ValueError(f"{directory}: no rule set (a subdirectory with ruleset.yaml)")
    return catalog, seen


class Watcher:
    """Polls a rule-sets directory from a thread of the supervisor. A directory whose snapshot
    changed, and then stayed the same for one more look (so a save in progress is not judged
    half-written), is validated in a subprocess; ``on_verdict(snapshot, verdict)`` gets the
    result, on this thread."""

    def __init__(self, directory: Path, seen: Mapping[Path, str], interval: float,
                 on_verdict: Callable[[Snapshot, dict[str, Any]], None]) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self._seen = dict(seen)  # the digest last validated (or served at start) per directory
        self._pending: dict[Path, str] = {}  # a changed digest waiting to be seen again
        self._on_verdict = on_verdict
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="needlepoint-watcher", daemon=True)
        self._validating: subprocess.Popen | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling; kill a validation in progress."""
        self._stop.set()
        proc = self._validating
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_once()
            except Exception:  # never let the watcher die; the server keeps serving
                log.exception("rule-set watch failed")

    def check_once(self) -> None:
        """One look at every rule-set directory; validates those that changed and settled."""
        for sub in discover(self.directory):
            if self._stop.is_set():
                return
            snapshot = Snapshot.read(sub)
            if snapshot.digest == self._seen.get(sub):
                self._pending.pop(sub, None)
                continue
            if self._pending.get(sub) != snapshot.digest:
                self._pending[sub] = snapshot.digest  # judge it once it holds still for a look
                continue
            del self._pending[sub]
            self._seen[sub] = snapshot.digest
            log.info("rule set changed on disk: %s (%s); validating", sub, snapshot.digest)
            try:
                verdict = validate_in_subprocess(snapshot, started=self._started)
            except Exception as exc:  # a rejection all the same: never serve what was not judged
                log.exception("validation of %s failed", sub)
                verdict = {"ok": False, "message": f"validation failed: {exc}"}
            if not self._stop.is_set():
                self._on_verdict(snapshot, verdict)

    def _started(self, proc: subprocess.Popen) -> None:
        self._validating = proc
        if self._stop.is_set():
            proc.kill()


def id_of(snapshot: Snapshot) -> str:
    """The rule-set id a snapshot declares (for reporting a rejection), else its directory name."""
    try:
        from needlepoint.rulesets.reader import read_text

        meta = read_text(
            snapshot.files.get("ruleset.yaml", b"").decode("utf-8"), "ruleset.yaml", "ruleset.yaml", positions=False
        ).value
        return str((meta or {}).get("id") or Path(snapshot.source).name)
    except Exception:  # noqa: BLE001 - an unreadable ruleset.yaml: the directory name will do
        return Path(snapshot.source).name


def main() -> None:
    """Validation subprocess: a pickled :class:`Snapshot` on standard input, the pickled verdict on
    standard output (anything the checks print goes to standard error)."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    snapshot = pickle.loads(sys.stdin.buffer.read())
    out.write(pickle.dumps(validate_snapshot(snapshot)))
    out.flush()


if __name__ == "__main__":
    # Run the package's own module, not this __main__ copy, so the verdict pickles as
    # needlepoint.server.reload.Accepted for the supervisor to load.
    from needlepoint.server.reload import main as _main

    _main()
