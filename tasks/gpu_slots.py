"""GPU slots: flow runs on one machine queue for the accelerator instead of running out of memory together.

A run holds `training.gpu_slots` slots of the Prefect global concurrency limit `training.gpu_concurrency_limit`
(default `gpu`) from loading the base model until the flow ends, so the next run loads its weights only after the
previous one let go of its memory. `make deploy` creates the limit (`prefect gcl create gpu --limit 1`): one slot
per GPU, so runs of `gpu_slots: 1` on a one-GPU worker go one at a time. Slots are leases that Prefect renews
while the run lives (`training.gpu_slot_lease_s`, a minute); the slot of a run killed outright frees itself when its
lease expires (the server's repossessor service, every 15 s, revokes it); a stopped run (SIGTERM, Ctrl-C, a
cancellation) gives it back at once. Without the limit (no
`make deploy`), Prefect warns once and the run goes ahead.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from pipeline_config.schema import TrainingConfig


def _logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@contextlib.contextmanager
def gpu_slots(cfg: TrainingConfig) -> Iterator[float]:
    """Hold the run's slots of the GPU limit for the body; yields the seconds spent waiting for them."""
    if not cfg.gpu_slots:
        yield 0.0
        return
    import mlflow
    from prefect.concurrency.sync import concurrency

    log = _logger()
    log.info(
        "waiting for %d slot(s) of the global concurrency limit %r (GPU slots: one run at a time per GPU)",
        cfg.gpu_slots,
        cfg.gpu_concurrency_limit,
    )
    started = time.monotonic()
    # The lease is renewed while this process lives; a run killed outright frees its slots when it runs out.
    with concurrency(cfg.gpu_concurrency_limit, occupy=cfg.gpu_slots, lease_duration=cfg.gpu_slot_lease_s):
        waited_s = time.monotonic() - started
        log.info("holding %d slot(s) of %r after %.0f s", cfg.gpu_slots, cfg.gpu_concurrency_limit, waited_s)
        if mlflow.active_run() is not None:
            mlflow.log_metric("gpu_slot_wait_s", waited_s)
        yield waited_s
