"""qlora/stop.py on its own: what the first and the second signal do, forwarding to children, and the watchdog
that keeps the grace period when a step is too long. (The real flow under signals: tests/test_resume.py,
tests/test_distributed.py, tests/test_sweep.py, tests/test_prefect_e2e.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qlora.stop import GracefulStop, RunInterrupted, current, graceful_stop

REPO = Path(__file__).resolve().parent.parent


def test_first_signal_while_training_asks_for_a_stop_the_second_stops_at_once():
    said, forwarded = [], []
    stop = GracefulStop(grace_s=30, announce=said.append)
    with stop.forwarding_to(forwarded.append), stop.deferred():
        stop.handle(signal.SIGINT)  # training: no exception, the trainer stops at its next step
        assert stop.requested and stop.signal_name == "SIGINT" and not stop.at_once
        assert forwarded == [signal.SIGINT] and "training stops at the next optimizer step" in said[0]
        assert 0 < stop.seconds_left() <= 25
        with pytest.raises(RunInterrupted, match="stopped by SIGINT"):
            stop.handle(signal.SIGINT)
        assert stop.at_once and forwarded == [signal.SIGINT]  # forwarded once
    stop.done()


def test_a_signal_when_nothing_trains_stops_at_once_and_reports_the_step_when_training_stopped():
    stop = GracefulStop(grace_s=30, announce=lambda line: None)
    with pytest.raises(RunInterrupted) as info:
        stop.handle(signal.SIGTERM)
    assert info.value.step is None and info.value.exit_code == 143
    stopped = stop.interrupted(step=6, checkpoint="/runs/r/checkpoint-6")
    assert str(stopped) == (
        "stopped by SIGTERM at step 6 (checkpoint checkpoint-6 written); the next run resumes from its run folder"
    )
    import pickle

    assert pickle.loads(pickle.dumps(stopped)).step == 6  # crosses Prefect's state storage intact
    stop.done()


def test_handlers_are_installed_for_the_block_and_nested_blocks_share_the_stop():
    before = signal.getsignal(signal.SIGTERM)
    with graceful_stop(10) as outer:
        assert current() is outer and signal.getsignal(signal.SIGTERM) == outer.handle
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what Prefect's flow engine does when a flow starts
        with graceful_stop(99) as inner:
            assert inner is outer and signal.getsignal(signal.SIGTERM) == outer.handle  # put back for the flow
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert current() is None and signal.getsignal(signal.SIGTERM) == before


LONG_STEP = textwrap.dedent(
    """
    import os, signal, sys, time
    from qlora.stop import RunInterrupted, graceful_stop

    with graceful_stop(float(sys.argv[1])) as stop:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            try:
                while True:  # one training step that never ends
                    sum(range(1000))
            except RunInterrupted as exc:
                print("interrupted:", exc, flush=True)
            while True:  # and a teardown that hangs
                time.sleep(0.01)
    """
)


def test_the_watchdog_stops_a_step_that_outlasts_the_grace_period_and_then_exits():
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", LONG_STEP, "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    took_s = time.monotonic() - started
    assert "interrupted: stopped by SIGTERM" in done.stdout  # at once, where the step was
    assert "the grace period of 2 s is over; exiting now" in done.stderr
    assert done.returncode == 143 and took_s < 15
