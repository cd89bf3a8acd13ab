"""Run independent cells of a sweep serially or on a Ray cluster, yielding outcomes as they finish.

A *cell* is a pure function of its arguments: ``cell_fn(context, item)``, where ``context`` is what
``setup()`` built once per worker (a loaded model; ``None`` without ``setup``) and ``item`` carries
everything else, seed included. Its result therefore depends only on the cell, never on which
worker ran it or when, so a distributed run reproduces the serial one bit for bit.

On Ray (:class:`Backend` with ``ray=True``) the cells run on a pool of actors, one per worker
(``num_cpus=1`` each; by default as many as the cluster has CPUs): each actor runs ``setup()`` once
(one model replica per actor) and then cells sent to it as it becomes free. Outcomes stream back
in completion order. A worker that dies is restarted and its cell retried (``retries`` times, Ray's
``max_restarts`` / ``max_task_retries``); a cell that raises becomes an :class:`Outcome` with its
error and the sweep goes on. Stopping the iteration (Ctrl-C, an exception in the caller, ``break``)
kills the actors; a cluster started here is shut down, one given by address is left running.

``ray`` is an optional dependency (``pip install tiltsample[ray]``), imported only here, inside the
functions that need it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SERIAL", "Backend", "CellWorker", "Outcome", "call_thunk", "run_cells"]


@dataclass(frozen=True)
class Backend:
    """Where cells run.

    Parameters
    ----------
    ray
        ``False``: serially in this process. ``True``: on Ray.
    address
        With ``ray``: the address of a running cluster (``ray start --head`` prints it, e.g.
        ``"10.0.0.1:6379"``, or ``"auto"``); ``None`` starts a local cluster on this machine (or
        uses the one this process already joined with ``ray.init``).
    workers
        With ``ray``: the number of actors (default: the cluster's CPUs, at most one per cell).
    retries
        With ``ray``: how often a dead worker is restarted and its cell retried.
    """

    ray: bool = False
    address: str | None = None
    workers: int | None = None
    retries: int = 3

    def describe(self) -> str:
        if not self.ray:
            return "serial"
        return f"ray ({self.address or 'local'})"


SERIAL = Backend()
"""Run every cell in this process, in order."""


@dataclass(frozen=True)
class Outcome:
    """What one cell gave: its index in the submitted list, its value or its error (one line)."""

    index: int
    value: Any = None
    error: str | None = None
    lost: bool = False
    """The worker died (more often than ``retries``): the cell did not fail, it did not finish;
    a resumable caller leaves it undone so that a rerun runs it again."""

    @property
    def ok(self) -> bool:
        return self.error is None


def error_text(exc: BaseException) -> str:
    """An exception as one line: ``Type: message``."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def call_thunk(context: Any, item: Callable[[], Any]) -> Any:
    """A cell function for items that are zero-argument callables (``functools.partial``)."""
    return item()


def _run_one(
    cell_fn: Callable[[Any, Any], Any], context: Any, index: int, item: Any, capture: bool
) -> Outcome:
    if not capture:
        return Outcome(index, cell_fn(context, item))
    try:
        return Outcome(index, cell_fn(context, item))
    except Exception as exc:  # a failing cell is recorded; the sweep goes on
        return Outcome(index, error=error_text(exc))


class CellWorker:
    """A Ray actor body: builds its context once, then runs cells (one model replica each)."""

    def __init__(self, setup: Callable[[], Any] | None, cell_fn: Callable[[Any, Any], Any]) -> None:
        self.context = None if setup is None else setup()
        self.cell_fn = cell_fn

    def run(self, index: int, item: Any, capture: bool) -> Outcome:
        return _run_one(self.cell_fn, self.context, index, item, capture)


def run_cells(
    cell_fn: Callable[[Any, Any], Any],
    items: Sequence[Any],
    *,
    setup: Callable[[], Any] | None = None,
    backend: Backend = SERIAL,
    capture_errors: bool = True,
) -> Generator[Outcome, None, None]:
    """Run ``cell_fn(context, item)`` for every item; yield an :class:`Outcome` per item.

    Serially the outcomes come in item order and ``setup()`` runs once, before the first cell (not
    at all without items); on Ray they come in completion order. With ``capture_errors`` an
    exception of a cell becomes the outcome's ``error``; ``KeyboardInterrupt`` always propagates.
    On Ray, ``cell_fn``, ``setup`` and the items must be picklable (cloudpickle) and importable on
    the workers. Closing the generator (or an exception in the caller's loop, which closes it)
    stops the workers.
    """
    if not items:
        return
    if backend.ray:
        yield from _ray_cells(cell_fn, items, setup, backend, capture_errors)
    else:
        yield from _serial_cells(cell_fn, items, setup, capture_errors)


def _serial_cells(
    cell_fn: Callable[[Any, Any], Any],
    items: Sequence[Any],
    setup: Callable[[], Any] | None,
    capture: bool,
) -> Iterator[Outcome]:
    context = None if setup is None else setup()
    for i, item in enumerate(items):
        yield _run_one(cell_fn, context, i, item, capture)


def _ray_cells(
    cell_fn: Callable[[Any, Any], Any],
    items: Sequence[Any],
    setup: Callable[[], Any] | None,
    backend: Backend,
    capture: bool,
) -> Iterator[Outcome]:
    import logging

    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=backend.address, include_dashboard=False, logging_level=logging.WARNING)
        started = True
    remote = ray.remote(num_cpus=1, max_restarts=backend.retries, max_task_retries=backend.retries)(
        CellWorker
    )
    n = backend.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    n = min(n, len(items))
    actors: list[Any] = []
    try:
        setup_ref = ray.put(setup)
        fn_ref = ray.put(cell_fn)
        actors = [remote.remote(setup_ref, fn_ref) for _ in range(n)]
        idle = deque(actors)
        queue = deque(range(len(items)))
        pending: dict[Any, tuple[Any, int]] = {}
        spare = n + backend.retries  # fresh actors allowed when one is gone for good
        while queue or pending:
            while idle and queue:
                actor, i = idle.popleft(), queue.popleft()
                pending[actor.run.remote(i, items[i], capture)] = (actor, i)
            if not pending:  # every actor is gone and none may be replaced
                for i in queue:
                    yield Outcome(i, error="no Ray worker left to run this cell", lost=True)
                return
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                actor, i = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # died more often than retries
                    if not capture:
                        raise
                    text = f"worker died: {error_text(exc)}"[:2000]
                    outcome = Outcome(i, error=text, lost=True)
                    ray.kill(actor)
                    actors.remove(actor)
                    if spare > 0:
                        spare -= 1
                        actor = remote.remote(setup_ref, fn_ref)
                        actors.append(actor)
                    else:
                        actor = None
                except ray.exceptions.RayTaskError as exc:  # cell_fn raised (not captured)
                    raise exc.as_instanceof_cause() from None
                if actor is not None:
                    idle.append(actor)
                yield outcome
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
