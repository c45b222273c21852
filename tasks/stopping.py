"""A flow run's graceful stop (qlora/stop.py) as Prefect sees it.

`stop_on_signals` is opened by the flow around its steps: SIGTERM and SIGINT stop training at the next optimizer
step (the handlers replace, for that time, the SIGTERM bridge Prefect's flow engine installs, which would abort
training at once). The stop then ends the flow run:

- Cancelled, when Prefect asked for it (a cancellation in the UI or the API: the runner tells the flow's process
  over its control channel, then sends SIGTERM);
- Crashed otherwise, with the stop's one line as the state message ("stopped by SIGTERM at step 6 (checkpoint
  checkpoint-6 written) ...").

Written for Prefect 3.9 (private names; tests/test_integrations.py checks them). Before it sends SIGTERM, the
runner (or process worker) hands the flow's process a "cancel" intent over a control channel, and the process
accepts it only while Prefect's own SIGTERM handler, `prefect.utilities.engine._prefect_sigterm_handler`, is the
installed one. Ours is installed instead, so while it is, that name points at ours: the intent is accepted, then
read with `prefect._internal.control_listener.get_intent()`, and the stop is reported by raising
`TerminationSignal`, which the flow engine turns into Cancelled when the intent is "cancel".
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from qlora.stop import GracefulStop, RunInterrupted, graceful_stop

WRITTEN_FOR = {"prefect": "3.9.1"}


def cancellation_requested() -> bool:
    """True when the SIGTERM this process got was Prefect cancelling its flow run."""
    from prefect._internal.control_listener import get_intent

    return get_intent() == "cancel"


@contextlib.contextmanager
def _cancellations_accepted() -> Iterator[None]:
    """While our SIGTERM handler is installed, Prefect's control channel takes it for its own bridge, so that a
    cancellation's intent is accepted (and acknowledged to the runner) before its SIGTERM arrives."""
    import prefect.utilities.engine as engine

    try:
        installed = signal.getsignal(signal.SIGTERM)  # the very object installed: Prefect compares identities
    except ValueError:  # not the main thread
        installed = None
    if _stop_of(installed) is None:  # no graceful stop here: Prefect's own bridge stays as it is
        yield
        return
    with engine._prefect_sigterm_bridge_lock:
        previous, engine._prefect_sigterm_handler = engine._prefect_sigterm_handler, installed
    try:
        yield
    finally:
        with engine._prefect_sigterm_bridge_lock:
            engine._prefect_sigterm_handler = previous


def _stop_of(handler) -> GracefulStop | None:
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, GracefulStop) else None


@contextlib.contextmanager
def stop_on_signals(grace_s: float) -> Iterator[GracefulStop | None]:
    """Graceful stop inside the block; a stop Prefect asked for leaves the flow run Cancelled."""
    with graceful_stop(grace_s) as stop, _cancellations_accepted():
        try:
            yield stop
        except RunInterrupted as exc:
            if cancellation_requested():
                from prefect.exceptions import TerminationSignal

                raise TerminationSignal(signal.SIGTERM) from exc
            raise
