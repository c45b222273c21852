"""Register the adapter in the MLflow model registry and move the `champion` / `challenger` aliases.

Format: an MLflow pyfunc model (`QLoRAChatModel`, qlora/serving.py) whose artifact is the adapter folder (LoRA
safetensors, tokenizer with its chat template, resolved config, checksums); the base weights are not copied. The
base is named in the model config and the version tags: a hub id + revision, or a local path + the content digest
of its weights.
Why pyfunc and not the transformers flavor: the flavor's PEFT support references the base by hub id only; the
embedded default's base is a local conversion of a GGUF file, and every base here must be re-loaded in 4-bit with
the run's BitsAndBytesConfig, which pyfunc's `load_context` does.

Champion rule: the new version always becomes `challenger`; it becomes `champion` when there is none, or when the
champion was trained on the same dataset digest and the new version's metric is better (config: metric, direction).
A champion of another dataset is never displaced.
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline_config.schema import PipelineConfig
from qlora.model_source import ModelSource
from qlora.save import adapter_checksum

CHAMPION, CHALLENGER = "champion", "challenger"
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_model_name(cfg: PipelineConfig) -> str:
    base = Path(cfg.model.gguf_file or cfg.model.name_or_path.rstrip("/")).stem.split("/")[-1]
    data = Path(cfg.data.source.split(":")[-1]).stem.split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}-{data}").strip("-")


@dataclass
class PromotionDecision:
    version: str
    became_champion: bool
    reason: str
    candidate_metric: float | None
    champion_metric: float | None
    previous_champion: str | None


def stage_tags(cfg: PipelineConfig, starting=None) -> dict[str, str]:
    """The training stage (training.method) and, for a stage from an earlier adapter, its lineage."""
    from qlora.stages import STAGE_TAG

    return {STAGE_TAG: cfg.training.method, **(starting.lineage_tags() if starting is not None else {})}


def starting_metric(cfg: PipelineConfig, metrics: dict[str, float], starting=None) -> float | None:
    """For a stage that started from an adapter: `registry.metric` of that adapter, as this run measured it (the
    evaluation's "before": `finetuned_<m>` -> `base_<m>`). None otherwise."""
    prefix = "finetuned_"
    if starting is None or not cfg.registry.metric.startswith(prefix):
        return None
    return metrics.get("base_" + cfg.registry.metric.removeprefix(prefix))


def decide_champion(
    client: MlflowClient,
    name: str,
    version: str,
    metric: float | None,
    digest: str,
    cfg: PipelineConfig,
    guard_check=None,
    starting_metric: float | None = None,
) -> PromotionDecision:
    """Apply the champion rule (module docstring) and move the aliases. `guard_check(champion version)` -> (passed,
    what each guard found): a challenger that wins on the metric is promoted only if it passes (qlora/gate.py)."""
    client.set_registered_model_alias(name, CHALLENGER, version)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    champion_metric = None
    if current is None:
        won, reason = True, "no champion yet"
    elif current.tags.get("dataset_digest") != digest:
        won, reason = False, f"champion v{current.version} was trained on another dataset digest; not compared"
    else:
        raw = current.tags.get(f"metric.{cfg.registry.metric}")
        champion_metric = float(raw) if raw is not None else None
        if metric is None:
            won, reason = False, f"this run has no {cfg.registry.metric}"
        elif champion_metric is None:
            won, reason = True, f"champion v{current.version} has no {cfg.registry.metric}"
        else:
            better = metric > champion_metric if cfg.registry.greater_is_better else metric < champion_metric
            won = better
            verdict = "beats" if better else "does not beat"
            reason = f"{cfg.registry.metric} {metric:.4f} {verdict} champion v{current.version}'s {champion_metric:.4f}"
    if won and starting_metric is not None:
        # a stage after SFT must also beat the model it started from, measured on the same rows in this run: a
        # stage that made its starting champion worse is never promoted, even as the first version of its name
        better = metric is not None and (
            metric > starting_metric if cfg.registry.greater_is_better else metric < starting_metric
        )
        won = better
        shown = "none" if metric is None else f"{metric:.4f}"
        reason += (
            f"; {cfg.registry.metric} {shown} {'beats' if better else 'does not beat'} the starting adapter's "
            f"{starting_metric:.4f} (measured in this run)"
        )
    if won and current is not None and guard_check is not None:
        passed, found = guard_check(current)
        won = passed
        reason += f"; guards {'hold' if passed else 'block it'}: {found}"
    if won:
        client.set_registered_model_alias(name, CHAMPION, version)
    return PromotionDecision(version, won, reason, metric, champion_metric, current.version if current else None)


def register_adapter(
    cfg: PipelineConfig,
    source: ModelSource,
    adapter_dir: str,
    metrics: dict[str, float],
    dataset_digest: str,
    adapter_dtype: str,
    suites=(),
    starting=None,
) -> PromotionDecision:
    """Log the pyfunc model into the active run, register a version, tag it, and move the aliases. A stage after SFT
    is tagged with its method and, with `starting` (qlora/stages.py), the version and run it started from."""
    from qlora.tracking import store_lock

    # Runs that finish together must not both see "no champion" and both take the alias (tracking.store_lock).
    with store_lock(mlflow.get_tracking_uri()):
        return _register_adapter(cfg, source, adapter_dir, metrics, dataset_digest, adapter_dtype, suites, starting)


def _register_adapter(
    cfg, source: ModelSource, adapter_dir, metrics, dataset_digest, adapter_dtype, suites, starting=None
):
    from qlora.provenance import git_commit, library_versions
    from qlora.serving import QLoRAChatModel

    name = cfg.registry.model_name or default_model_name(cfg)
    base_path = source.path
    base_is_local = source.is_local
    base_tags = (
        {"base_model_path": str(Path(base_path).resolve()), "base_model_digest": source.digest or ""}
        if base_is_local
        else {"base_model_id": base_path, "base_model_revision": cfg.model.revision or "main"}
    )
    adapter_sha = adapter_checksum(Path(adapter_dir))
    versions = library_versions()
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=QLoRAChatModel(),
        artifacts={"adapter": adapter_dir},
        code_paths=[str(REPO_ROOT / "qlora"), str(REPO_ROOT / "pipeline_config")],
        model_config={
            "base_model": str(Path(base_path).resolve()) if base_is_local else base_path,
            "base_revision": None if base_is_local else cfg.model.revision,
            "quantization": cfg.quantization.model_dump(mode="json"),
            "adapter_dtype": adapter_dtype,
            "upcast_base_to_fp32": cfg.lora.upcast_base_to_fp32,
            "adapter_sha256": adapter_sha,
            "max_new_tokens": cfg.registry.max_new_tokens,
        },
        pip_requirements=[f"{k}=={v}" for k, v in versions.items() if v != "missing"],
        registered_model_name=name,
        # MLflow would tag the logged model with $MLFLOW_TRACKING_USERNAME (a credential): name the OS user instead.
        tags={"mlflow.user": getpass.getuser()},
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    tags = {
        **base_tags,
        "dataset_digest": dataset_digest,
        "dataset_source": cfg.data.source,
        "git_commit": git_commit(),
        "adapter_sha256": adapter_sha,
        "run_id": mlflow.active_run().info.run_id,
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
        **{f"version.{k}": v for k, v in versions.items()},
        **stage_tags(cfg, starting),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    base_desc = base_tags.get("base_model_id") or base_tags["base_model_path"]
    client.update_model_version(
        name, version, description=f"QLoRA adapter on {base_desc}, data {cfg.data.source} (digest {dataset_digest})."
    )
    guard_check = None
    if suites:
        from qlora.gate import SUITE_VERSION_TAG, champion_tags, guard_check_for
        from qlora.suites import suite_version

        for result in suites:
            client.set_model_version_tag(name, version, SUITE_VERSION_TAG + result.suite.name, suite_version(result))
            if result.champion is not None:  # the champion, scored by this run: its scores go on its version
                for key, value in champion_tags([result]).items():
                    client.set_model_version_tag(name, result.champion_version, key, value)
        if cfg.registry.guards:
            guard_check = guard_check_for(cfg, metrics, suites)
    metric = metrics.get(cfg.registry.metric)
    decision = decide_champion(
        client, name, version, metric, dataset_digest, cfg, guard_check, starting_metric(cfg, metrics, starting)
    )
    mlflow.set_tags(
        {
            "registry.model_name": name,
            "registry.version": version,
            "registry.decision": "champion" if decision.became_champion else "challenger",
            "registry.reason": decision.reason[:4900],
        }
    )
    client.set_model_version_tag(name, version, "registry.reason", decision.reason[:4900])
    if decision.candidate_metric is not None:
        mlflow.log_metric("registry.candidate_metric", decision.candidate_metric)
    if decision.champion_metric is not None:
        mlflow.log_metric("registry.champion_metric", decision.champion_metric)
    return decision


def promote(name: str, version: str, reason: str, tracking_uri: str | None = None) -> None:
    """Move `champion` by hand; the reason is kept as a version tag."""
    client = MlflowClient(tracking_uri)
    client.get_model_version(name, version)  # raises a clear MlflowException if it does not exist
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promoted_by_hand_reason", reason)


MERGED_SUFFIX = "-merged"
MERGE_EXPERIMENT = "qlora-merges"


def source_registry_version(source: str) -> tuple[str, str] | None:
    """(name, version) of an adapter model URI `models:/NAME@alias` or `models:/NAME/VERSION`; None otherwise."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", source)
    if not match:
        return None
    name, alias, version = match.groups()
    if alias:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    return name, str(version)


def merged_model_name(loaded) -> str:
    """`<adapter's registered name>-merged` (the run's registry name for an adapter folder)."""
    registered = source_registry_version(loaded.source)
    base = registered[0] if registered else (loaded.config.registry.model_name or default_model_name(loaded.config))
    return base + MERGED_SUFFIX


def merged_requirements() -> dict[str, str]:
    from qlora.provenance import library_versions

    return library_versions(("torch", "transformers", "accelerate", "tokenizers", "safetensors"))


def register_merged_model(merged_dir: Path, loaded, check: dict, flow_tags: dict[str, str] | None = None) -> dict:
    """Log the merged model in MLflow's transformers flavor (an OpenAI-style chat signature and an input example for
    a chat model) as a new version of `<name>-merged`, in its own run of the `qlora-merges` experiment, tagged with
    the adapter it came from; returns {name, version, run_id}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = merged_model_name(loaded)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto")
    chat = bool(tokenizer.chat_template)
    example_prompt = "Order from Ana Chen: 2 yoga mats, 3 May 2025."
    source = source_registry_version(loaded.source)
    tags = {
        "source_model": loaded.source,
        "source_adapter_dir": str(loaded.adapter_dir),
        **({"source_adapter_name": source[0], "source_adapter_version": source[1]} if source else {}),
    }
    uri = mlflow.get_tracking_uri()
    from qlora.tracking import model_training_experiment, store_lock

    with store_lock(uri):
        experiment = model_training_experiment(MERGE_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=f"merge {name}", tags=flow_tags or {}):
        mlflow.log_params({"source_model": loaded.source, "merged_dir": str(merged_dir), "dtype": str(model.dtype)})
        mlflow.log_metrics({k: float(v) for k, v in check.items() if isinstance(v, int | float)})
        with store_lock(uri):
            info = mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name="model",
                task="llm/v1/chat" if chat else "text-generation",
                input_example={"messages": [{"role": "user", "content": example_prompt}]} if chat else example_prompt,
                registered_model_name=name,
                # a standalone model needs no peft or bitsandbytes (and MLflow's default list asks for torchvision)
                pip_requirements=[f"{k}=={v}" for k, v in merged_requirements().items() if v != "missing"],
                tags={"mlflow.user": getpass.getuser()},
            )
        version = str(info.registered_model_version)
        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.update_model_version(
            name, version, description=f"{loaded.source} merged into its de-quantized base ({model.dtype})."
        )
        run_id = mlflow.active_run().info.run_id
    return {"name": name, "version": version, "run_id": run_id, "tags": tags}
