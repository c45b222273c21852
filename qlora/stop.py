"""Graceful stop: SIGTERM and SIGINT (Ctrl-C) end a run at the next optimizer step, with a checkpoint of that step
when one fits in the grace period, and within that period.

Production stops work with SIGTERM and a grace period before SIGKILL: Kubernetes evictions and spot reclaims (30 s by
default), Prefect's runner cancelling a flow run (30 s), `timeout` and systemd (to the whole process group). People
press Ctrl-C. What a stop must leave behind: a checkpoint the next run resumes from, the MLflow run KILLED, the
Prefect flow run Cancelled or Crashed, locks and GPU slots released, no child process alive.

    with graceful_stop(cfg.training.stop_grace_s):      # the flow's body (the CLI's command, a deployment run)
        ...
        with stop.deferred():                           # qlora/train.py, around trainer.train()
            ...                                         # StopAtNextStep (qlora/integrations/trainer.py) ends it

- First signal: recorded and forwarded to the run's child processes (torchrun, which forwards it to every rank).
  While something trains, training stops at the end of the current optimizer step; otherwise the run stops at once.
  Either way `RunInterrupted` ends the run (a BaseException, like KeyboardInterrupt: no `except Exception` swallows
  it, and the MLflow run closes KILLED).
- A second signal stops at once (`RunInterrupted` raised right where the main thread is).
- A watchdog keeps the promise when a step is too long: near the end of the grace period it stops the run at once,
  and at its end it exits the process (exit code 128 + signal), whatever is still running.

Signal handlers can only be installed from the main thread. A flow that runs in another thread (a sweep's trial)
uses the stop of the process it runs in; with none, it has no graceful stop.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Time kept back at the end of the grace period for what follows the stop: closing the MLflow run, the Prefect
# state, stopping a temporary Prefect server.
TEARDOWN_S = 5.0


class RunInterrupted(BaseException):
    """The run was stopped by a signal. `step`: the optimizer step training reached (None: it was not training);
    `checkpoint`: the checkpoint folder written at that step, if one was."""

    def __init__(self, signal_name: str, step: int | None = None, checkpoint: str | None = None) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(self.describe())

    def __reduce__(self):
        return type(self), (self.signal_name, self.step, self.checkpoint)

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))

    def describe(self) -> str:
        if self.step is None:
            return f"stopped by {self.signal_name}"
        kept = (
            f"checkpoint {Path(self.checkpoint).name} written"
            if self.checkpoint
            else "no checkpoint of that step: it did not fit in the grace period"
        )
        return f"stopped by {self.signal_name} at step {self.step} ({kept}); the next run resumes from its run folder"


class GracefulStop:
    """One process's stop request: which signal, when, and whether anything is training."""

    def __init__(self, grace_s: float, announce: Callable[[str], None] | None = None) -> None:
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self.at_once = False
        self._requested = threading.Event()
        self._lock = threading.Lock()
        self._deferring = 0
        self._forwards: list[Callable[[int], None]] = []
        self._done = threading.Event()
        self._announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    @property
    def is_deferred(self) -> bool:
        return self._deferring > 0

    def seconds_left(self) -> float:
        """Seconds of the grace period left for stopping before the teardown's share (inf before any signal)."""
        if self.received_at is None:
            return float("inf")
        return self.grace_s - TEARDOWN_S - (time.monotonic() - self.received_at)

    def interrupted(self, step: int | None = None, checkpoint: str | None = None) -> RunInterrupted:
        return RunInterrupted(self.signal_name or "SIGTERM", step, checkpoint)

    def request(self, signum: int) -> None:
        """Record the stop (first signal only), forward it to child processes and arm the watchdog."""
        with self._lock:
            if self.requested:
                return
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.monotonic()
            self._requested.set()
            forwards = list(self._forwards)
        for forward in forwards:
            with contextlib.suppress(Exception):
                forward(signum)
        threading.Thread(target=self._watchdog, args=(signum,), name="graceful-stop-watchdog", daemon=True).start()

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler (main thread)."""
        if self.requested:
            self.at_once = True
            raise self.interrupted()
        self.request(signum)
        if not self.is_deferred:
            raise self.interrupted()
        self._announce(
            f"{self.signal_name} received: training stops at the next optimizer step and writes a checkpoint of it if "
            f"one fits in {self.grace_s:.0f} s (training.stop_grace_s); send it again to stop at once"
        )

    @contextlib.contextmanager
    def deferred(self) -> Iterator[GracefulStop]:
        """While the block runs, a signal is left to the code inside to act on at its next safe point (training: the
        end of the optimizer step; a sweep: once its trials have stopped) instead of stopping the run at once."""
        with self._lock:
            self._deferring += 1
        try:
            yield self
        finally:
            with self._lock:
                self._deferring -= 1

    @contextlib.contextmanager
    def forwarding_to(self, forward: Callable[[int], None]) -> Iterator[None]:
        """While the block runs, a stop request is forwarded to a child process (`forward(signum)`)."""
        with self._lock:
            self._forwards.append(forward)
            signum = getattr(signal, self.signal_name) if self.requested else None
        if signum is not None:
            forward(signum)
        try:
            yield
        finally:
            with self._lock:
                self._forwards.remove(forward)

    def _watchdog(self, signum: int) -> None:
        assert self.received_at is not None
        soft = self.received_at + max(self.grace_s - TEARDOWN_S, self.grace_s / 2)
        if self._done.wait(max(0.0, soft - time.monotonic())):
            return
        self.at_once = True
        _thread.interrupt_main(signum)  # the handler runs again in the main thread: the run stops at once, there
        if self._done.wait(max(0.0, self.received_at + self.grace_s - time.monotonic())):
            return
        self._announce(f"{self.signal_name}: the grace period of {self.grace_s:.0f} s is over; exiting now")
        os._exit(128 + signum)

    def done(self) -> None:
        """The run is over: the watchdog stands down."""
        self._done.set()


_current: GracefulStop | None = None


def current() -> GracefulStop | None:
    """The stop of this process's run, if a `graceful_stop` block is active."""
    return _current


@contextlib.contextmanager
def graceful_stop(grace_s: float) -> Iterator[GracefulStop | None]:
    """Handle SIGTERM and SIGINT gracefully inside the block (module docstring). Nested blocks (the flow inside the
    CLI's block, a subflow) share the outermost one's stop and put its handlers back where something else replaced
    them meanwhile (Prefect's flow engine installs its own SIGTERM handler when a flow starts). In a thread other
    than the main one: the process's stop if there is one, else None (no graceful stop)."""
    global _current
    outermost = _current is None
    if outermost and threading.current_thread() is not threading.main_thread():
        yield None
        return
    stop = _current or GracefulStop(grace_s)
    replaced = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if signal.getsignal(s) != stop.handle:
                replaced[s] = signal.signal(s, stop.handle)
    if outermost:
        _current = stop
    try:
        yield stop
    finally:
        for s, handler in replaced.items():
            signal.signal(s, handler)
        if outermost:
            _current = None
            stop.done()


@contextlib.contextmanager
def stop_when_file_appears(path: Path, grace_s: float, poll_s: float = 0.2) -> Iterator[GracefulStop]:
    """A graceful stop requested by a file instead of a signal, for training that runs where no signal reaches it:
    a Ray Train worker runs the training function in a thread of its actor (the launcher writes `path` when it is
    told to stop, qlora/ray_launch.py). It is this process's stop (`current()`) inside the block, so training ends
    at the next optimizer step exactly as after a SIGTERM."""
    global _current
    stop = GracefulStop(grace_s)
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(poll_s):
            if path.exists():
                stop.request(signal.SIGTERM)
                return

    previous, _current = _current, stop
    watcher = threading.Thread(target=watch, name="stop-request-file", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        finished.set()
        _current = previous
        stop.done()
