"""Step `register-adapter` (qlora/registry.py): a model version, and the champion / challenger aliases. A version
that becomes champion is announced with a `qlora.champion.promoted` event, one per configured next stage
(`registry.next_stages`), which the qlora-align deployment's trigger turns into a run of that stage (prefect.yaml)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig
from qlora.registry import PromotionDecision, default_model_name, register_adapter

CHAMPION_PROMOTED_EVENT = "qlora.champion.promoted"


def champion_promoted_events(cfg: PipelineConfig, decision: PromotionDecision) -> list[dict]:
    """The events announcing a new champion (none for a challenger): one per next stage, whose config path is the
    `qlora.next_stage` label a trigger matches and passes on; one without it when no next stage is configured. The
    version is pinned in `qlora.model_uri` (models:/NAME/VERSION), so the next stage starts from this version even if
    the alias moves before it runs."""
    if not decision.became_champion:
        return []
    name = cfg.registry.model_name or default_model_name(cfg)
    resource = {
        "prefect.resource.id": f"mlflow.registered-model.{name}",
        "prefect.resource.name": name,
        "qlora.model_uri": f"models:/{name}/{decision.version}",
        "qlora.stage": cfg.training.method,
    }
    payload = {"version": decision.version, "reason": decision.reason}
    stages = cfg.registry.next_stages or [None]
    return [
        {
            "event": CHAMPION_PROMOTED_EVENT,
            "resource": resource | ({"qlora.next_stage": stage} if stage else {}),
            "payload": payload,
        }
        for stage in stages
    ]


@task(name="register-adapter", cache_policy=NO_CACHE, persist_result=False)
def register_adapter_task(
    cfg, source, adapter_dir, metrics, dataset_digest, adapter_dtype, suites=(), starting=None
) -> PromotionDecision:
    """Not retried: a retry after a half-done registration would add a second version of the same run. `starting`:
    the adapter a stage started from (its lineage goes on the version)."""
    decision = register_adapter(cfg, source, adapter_dir, metrics, dataset_digest, adapter_dtype, suites, starting)
    events = champion_promoted_events(cfg, decision)
    if events:
        from prefect.events import emit_event

        for event in events:
            emit_event(**event)
        stages = [e["resource"]["qlora.next_stage"] for e in events if "qlora.next_stage" in e["resource"]]
        get_run_logger().info(
            "%s: %s%s", CHAMPION_PROMOTED_EVENT, events[0]["resource"]["qlora.model_uri"],
            f"; next stages: {', '.join(stages)}" if stages else "",
        )  # fmt: skip
    return decision
