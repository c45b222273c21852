"""The merge flow: a trained adapter merged into its de-quantized base, checked, saved and registered.

    python -m flows.merge --model models:/smollm2-135m-orders@champion [--dtype bf16]
    prefect deployment run qlora-merge/merge-champion      (prefect.yaml's deployment)

Steps: load-adapter-model -> merge-adapter (de-quantize the 4-bit base, merge, check eval loss and greedy answers
against base + adapter in 4-bit, save; refuses and saves nothing when they differ) -> register-merged-model
(`<name>-merged`, transformers flavor) -> publish-merge-summary. `qlora-flow merge` does the first two without a
flow or a registry.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from tasks.merge import (
    load_adapter_model_task,
    merge_adapter_task,
    publish_merge_summary_task,
    register_merged_model_task,
)


@flow(name="qlora-merge")
def merge(
    model: str = "models:/smollm2-135m-orders@champion",
    output_dir: str = "outputs/merged",
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto",
    max_loss_change_pct: float = 1.0,
    min_agreement: float = 0.9,
    tracking_uri: str | None = None,
) -> dict:
    """Merge the adapter `model` (a registry URI or an adapter folder) and register the result.

    Args:
        model: the adapter: models:/NAME@alias, models:/NAME/VERSION, runs:/ID/model, or an adapter folder.
        output_dir: the merged model goes into a new folder of this run below it.
        dtype: the merged weights' dtype; auto = the base model's own dtype.
        max_loss_change_pct: allowed eval-loss change of the merged model against base + adapter in 4-bit.
        min_agreement: share of held-out prompts whose greedy answers must be identical.
        tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).
    """
    folder = Path(output_dir) / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{flow_run.get_name() or 'local'}"
    loaded = load_adapter_model_task(model, tracking_uri)
    result = merge_adapter_task(loaded, folder, dtype, max_loss_change_pct, min_agreement)
    registered = register_merged_model_task(
        result, loaded, tracking_uri, {"prefect.flow_run_id": str(flow_run.get_id())}
    )
    publish_merge_summary_task(model, result, registered)
    return {"merged_dir": str(result.path), "check": result.check.describe(), **registered}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="merge an adapter into its base and register it")
    parser.add_argument("--model", default="models:/smollm2-135m-orders@champion")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    parser.add_argument("--output-dir", default="outputs/merged")
    args = parser.parse_args()
    print(merge(model=args.model, dtype=args.dtype, output_dir=args.output_dir))
