"""The merge flow: a trained adapter merged into its de-quantized base, checked, saved and registered.

    qlora-flow merge --model models:/smollm2-135m-orders@champion [--dtype fp32] [--output DIR] [--no-register]
    prefect deployment run qlora-merge/merge-champion      (prefect.yaml's deployment)

Steps: check-merge-target (the output folder and the check limits, before any weights load) -> load-adapter-model
-> merge-adapter (de-quantize the 4-bit base, merge, check eval loss and greedy answers against base + adapter in
4-bit, save; refuses and saves nothing when they differ) -> register-merged-model (`<name>-merged`, transformers
flavor; unless register_model is off) -> publish-merge-summary.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from tasks.merge import (
    check_merge_target_task,
    load_adapter_model_task,
    merge_adapter_task,
    publish_merge_summary_task,
    register_merged_model_task,
)


@flow(name="qlora-merge")
def merge(
    model: str = "models:/smollm2-135m-orders@champion",
    output: str | None = None,
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto",
    max_loss_change_pct: float = 1.0,
    min_agreement: float = 0.9,
    register_model: bool = True,
    tracking_uri: str | None = None,
) -> dict:
    """Merge the adapter `model` into its base, check the result, save it and register it.

    Args:
        model: the adapter: an adapter folder or an MLflow model URI (models:/NAME@champion, models:/NAME/3,
            runs:/RUN_ID/model).
        output: a new folder for the merged model; default: one named for this flow run under outputs/merged.
        dtype: the merged weights' dtype; auto = the base model's own dtype.
        max_loss_change_pct: allowed eval-loss change (%) of the merged model against base + adapter in 4-bit.
        min_agreement: share (0-1) of held-out prompts whose greedy answers must be identical.
        register_model: register the merged model as a version of `<name>-merged` in the MLflow registry.
        tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).
    """
    folder = check_merge_target_task(output, max_loss_change_pct, min_agreement)
    loaded = load_adapter_model_task(model, tracking_uri)
    result = merge_adapter_task(loaded, folder, dtype, max_loss_change_pct, min_agreement)
    registered = {}
    if register_model:
        registered = register_merged_model_task(
            result, loaded, tracking_uri, {"prefect.flow_run_id": str(flow_run.get_id())}
        )
    publish_merge_summary_task(model, result, registered)
    return {
        "merged_dir": str(result.path),
        "dtype": result.dtype,
        "seconds": result.seconds,
        "peak_memory_mib": result.peak_memory_mib,
        "check": result.check.describe(),
        **registered,
    }


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["merge", *__import__("sys").argv[1:]]))
