"""Step `preflight` (qlora/preflight.py): every check that needs no weights, before any weights load."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from qlora.preflight import PreflightReport, check_preflight


@task(name="preflight", cache_policy=NO_CACHE, persist_result=False)
def preflight_task(cfg, source, data, tokenizer, device) -> PreflightReport:
    report = check_preflight(cfg, source, data, tokenizer, device)
    get_run_logger().info(report.render())
    return report
