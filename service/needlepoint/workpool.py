"""Evaluating many inputs on every core: a pool of spawned worker processes, and a progress bar.

Used by ``needlepoint rules diff`` and ``needlepoint batch``. The caller cuts its inputs into
*chunks* (a chunk is whatever its worker's ``run`` takes: a list of files, a bucket of patients)
and gives a *factory*, a module-level function that builds the worker object from a *state*
(rule sets, options) once per process. The state is pickled once to a temporary file that each
worker reads at start-up: reading a file is much faster than loading YAML again, and it keeps
the spawn message small (a child that dies before reading a large one leaves its parent blocked
on the pipe).

A worker that dies (a fault in the C rule engine) costs only the chunks in flight: the caller's
``on_lost(chunk, why)`` reports each of them, the pool is replaced and the run goes on, up to
``max_restarts`` times; after that every chunk left is reported lost.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

# Restarts of the worker pool after a worker died, before the rest of the run is given up.
MAX_POOL_RESTARTS = 3

_worker: Any = None


def can_spawn() -> bool:
    """Whether a spawned child can re-create ``__main__`` (not when it was read from standard
    input, for instance): otherwise every worker would die at start-up."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or path is None or os.path.isfile(path)


def _init_worker(factory: Callable[[Any], Any], state_file: str) -> None:
    """Build this process's worker from the pickled state (runs once per worker process)."""
    global _worker
    with open(state_file, "rb") as fh:
        state = pickle.load(fh)
    _worker = factory(state)


def _work(chunk: Any) -> Any:
    assert _worker is not None, "the worker was not initialised"
    return _worker.run(chunk)


def run_pool(
    chunks: Sequence[Any],
    jobs: int,
    state: Any,
    factory: Callable[[Any], Any],
    on_result: Callable[[Any], None],
    on_lost: Callable[[Any, str], None],
    *,
    max_restarts: int = MAX_POOL_RESTARTS,
) -> None:
    """Run ``factory(state).run(chunk)`` for every chunk on ``jobs`` spawned processes, a few
    chunks in flight per process, and hand each result to ``on_result`` as it arrives (in
    completion order, not input order). ``factory`` must be importable by name (a module-level
    function or class) and ``state`` picklable."""
    with tempfile.NamedTemporaryFile(prefix="needlepoint-pool-", suffix=".pickle", delete=False) as fh:
        pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        _run(list(chunks), jobs, (factory, fh.name), on_result, on_lost, max_restarts)
    finally:
        os.unlink(fh.name)


def _run(chunks: list, jobs: int, initargs: tuple, on_result: Callable, on_lost: Callable, max_restarts: int) -> None:
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    pending = deque(chunks)
    restarts = 0
    context = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads (gRPC, the progress bar)
    while pending:
        if restarts > max_restarts:
            while pending:
                on_lost(pending.popleft(), "not evaluated: worker processes kept dying")
            return
        inflight: dict[Future, Any] = {}
        broken = False
        executor = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=initargs)
        try:
            while (pending or inflight) and not broken:
                while pending and len(inflight) < jobs * 3:
                    chunk = pending.popleft()
                    inflight[executor.submit(_work, chunk)] = chunk
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for future in done:
                    chunk = inflight.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        on_lost(chunk, "not evaluated: the worker process died")
                    except Exception as exc:  # noqa: BLE001 - e.g. a result that does not pickle
                        on_lost(chunk, f"not evaluated: {type(exc).__name__}: {exc}")
                    else:
                        on_result(result)
            for chunk in inflight.values():  # a broken pool fails everything in flight
                on_lost(chunk, "not evaluated: a worker process died while this was in flight")
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        restarts += broken


class ProgressBar:
    """A rich progress bar on standard error (never standard output), measured in ``total``
    units of work (bytes of input, say), with a line of counts after the bar: ``counts`` is a
    format string over the fields given to the constructor and to :meth:`advance`, e.g.
    ``"{task.fields[cases]:,} cases"``. Transient: it disappears when stopped."""

    def __init__(self, label: str, total: int, counts: str, **fields: Any):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(label.replace("[", r"\[")),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn(counts),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task(label, total=max(total, 1), **fields)

    def start(self) -> None:
        self.progress.start()

    def advance(self, size: int, **fields: Any) -> None:
        self.progress.update(self.task, advance=size, **fields)

    def stop(self) -> None:
        self.progress.stop()
