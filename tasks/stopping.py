"""A flow run's graceful stop (qlora/stop.py) as Prefect sees it.

`stop_on_signals` is opened by the flow around its steps: SIGTERM and SIGINT stop training at the next optimizer
step (the handlers replace, for that time, the SIGTERM bridge Prefect's flow engine installs, which would abort
training at once). The stop then ends the flow run:

- Cancelled, when Prefect asked for it (a cancellation in the UI or the API: the runner tells the flow's process
  over its control channel, then sends SIGTERM);
- Crashed otherwise, with the stop's one line as the state message ("stopped by SIGTERM at step 6 (checkpoint
  checkpoint-6 written) ...").

Written for Prefect 3.9: the runner's intent is read with `prefect._internal.control_listener.get_intent()` (private;
tests/test_integrations.py checks it), and a cancellation is reported by raising `TerminationSignal`, which the
flow engine turns into Cancelled when that intent is "cancel".
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
def stop_on_signals(grace_s: float) -> Iterator[GracefulStop | None]:
    """Graceful stop inside the block; a stop Prefect asked for leaves the flow run Cancelled."""
    with graceful_stop(grace_s) as stop:
        try:
            yield stop
        except RunInterrupted as exc:
            if cancellation_requested():
                from prefect.exceptions import TerminationSignal

                raise TerminationSignal(signal.SIGTERM) from exc
            raise
