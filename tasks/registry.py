"""Step `register-adapter` (qlora/registry.py): a model version, and the champion / challenger aliases."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from qlora.registry import PromotionDecision, register_adapter


@task(name="register-adapter", cache_policy=NO_CACHE, persist_result=False)
def register_adapter_task(
    cfg, source, adapter_dir, metrics, dataset_digest, adapter_dtype, suites=(), starting=None
) -> PromotionDecision:
    """Not retried: a retry after a half-done registration would add a second version of the same run. `starting`:
    the adapter a stage started from (its lineage goes on the version)."""
    return register_adapter(cfg, source, adapter_dir, metrics, dataset_digest, adapter_dtype, suites, starting)
