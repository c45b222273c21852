"""Step 9: register the adapter in the MLflow model registry and move the `champion` / `challenger` aliases.

Format: an MLflow pyfunc model (`QLoRAChatModel`) whose artifact is the adapter folder (LoRA safetensors,
tokenizer with its chat template, resolved config, checksums); the base weights are not copied. The base is named in
the model config and the version tags: a hub id + revision, or a local path + the content digest of its weights.
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
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_config.schema import PipelineConfig
from tasks.save import adapter_checksum

CHAMPION, CHALLENGER = "champion", "challenger"
REPO_ROOT = Path(__file__).resolve().parent.parent


class QLoRAChatModel(mlflow.pyfunc.PythonModel):
    """Base model in 4-bit + the run's LoRA adapter; `predict` takes prompts and returns generated text."""

    # Input contract. `predict`'s type hints are what MLflow 3 records as the signature (log_model infers it from
    # them): MLflow supports list[...] of str/int/float/bool/bytes/datetime, dicts and lists of those, pydantic
    # models, and unions, which it records as Any and does not check. A prompt is a string or a chat, so the
    # hint is list[str | list[dict[str, str]]] (recorded: inputs [Any], outputs [string]). A list of strings
    # alone would turn chats away; a pydantic model would change the request's JSON. MLflow's own check of the
    # hint would refuse a bare string (not a list) and would read a DataFrame's first column whatever its name,
    # so it is switched off (the flag MLflow's ChatModel uses) and `normalize_prompts` checks the input instead:
    # a bad input raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server answers with a 400
    # and a message. With a type-hint signature the server reads only {"inputs": ...} (its dataframe_* request
    # formats are refused); a DataFrame with a `prompt` / `messages` column still works in-process.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch
        from peft import PeftModel, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline_config.schema import QuantizationConfig
        from tasks.model import build_bnb_config, pick_device
        from tasks.save import verify_adapter_dir

        cfg = context.model_config
        adapter = Path(context.artifacts["adapter"])
        verify_adapter_dir(adapter, cfg.get("adapter_sha256"))
        quant = QuantizationConfig.model_validate(cfg["quantization"])
        device = pick_device("auto")
        base = AutoModelForCausalLM.from_pretrained(
            cfg["base_model"],
            revision=cfg.get("base_revision"),
            quantization_config=build_bnb_config(quant),
            dtype=getattr(torch, quant.compute_dtype),
            device_map={"": device},
            use_safetensors=True,
        )
        # The same numerics the run evaluated: kbit preparation (norms in fp32) if the run used it, and adapters in
        # the trained dtype.
        if cfg.get("upcast_base_to_fp32", True):
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        self.model = PeftModel.from_pretrained(base, adapter).eval()
        dtype = getattr(torch, cfg["adapter_dtype"])
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(adapter)
        self.max_new_tokens = int(cfg["max_new_tokens"])

    def predict(
        self, context, model_input: list[str | list[dict[str, str]]], params: dict[str, Any] | None = None
    ) -> list[str]:
        """One greedy answer per prompt (`model_input`: any form `normalize_prompts` accepts).

        Raises MlflowException (INVALID_PARAMETER_VALUE) for an input that is none of those forms."""
        from tasks.evaluate import greedy_answers

        prompts = normalize_prompts(model_input, has_chat_template=bool(self.tokenizer.chat_template))
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return greedy_answers(self.model, self.tokenizer, prompts, max_new, batch_size=8)


def normalize_prompts(model_input, has_chat_template: bool) -> list:
    """A list of prompts, each a string or a chat (a list of {"role", "content"} turns), from: a string, one chat,
    a list of strings and/or chats, or a DataFrame with a `prompt` or `messages` column. Strings become a user turn
    when the tokenizer has a chat template.

    Raises MlflowException (INVALID_PARAMETER_VALUE, a 400 when served) naming what was wrong with the input."""
    forms = (
        "a prompt string, a chat (a list of {'role': str, 'content': str} turns), a list of prompt strings "
        "and/or chats, or a DataFrame with a 'prompt' or 'messages' column"
    )
    if hasattr(model_input, "columns"):  # pandas DataFrame (in-process predict, spark_udf)
        column = next((c for c in ("messages", "prompt") if c in model_input.columns), None)
        if column is None:
            raise MlflowException.invalid_parameter_value(
                f"Expected {forms}; got a DataFrame with columns {list(model_input.columns)}."
            )
        model_input = model_input[column].tolist()
    elif hasattr(model_input, "tolist"):  # numpy array or pandas Series
        model_input = model_input.tolist()
    if isinstance(model_input, str) or (
        isinstance(model_input, list) and model_input and isinstance(model_input[0], dict)
    ):
        model_input = [model_input]  # a single prompt
    if not isinstance(model_input, list):
        raise MlflowException.invalid_parameter_value(
            f"Expected {forms}; got {type(model_input).__name__}: {repr(model_input)[:100]}."
        )
    prompts: list = []
    for i, prompt in enumerate(model_input):
        if hasattr(prompt, "tolist"):  # a `messages` cell of a DataFrame may hold a numpy array of turns
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            prompts.append([{"role": "user", "content": prompt}] if has_chat_template else prompt)
            continue
        is_chat = isinstance(prompt, list | tuple) and len(prompt) > 0
        is_chat = is_chat and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in prompt
        )
        if not is_chat:
            raise MlflowException.invalid_parameter_value(
                f"Expected {forms}; prompt {i} is {type(prompt).__name__}: {repr(prompt)[:100]}."
            )
        if not has_chat_template:
            raise MlflowException.invalid_parameter_value(
                f"Prompt {i} is a chat, but this model's tokenizer has no chat template: send plain strings."
            )
        prompts.append([dict(t) for t in prompt])
    return prompts


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


def decide_champion(
    client: MlflowClient, name: str, version: str, metric: float | None, digest: str, cfg: PipelineConfig
) -> PromotionDecision:
    """Apply the champion rule (module docstring) and move the aliases."""
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
    if won:
        client.set_registered_model_alias(name, CHAMPION, version)
    return PromotionDecision(version, won, reason, metric, champion_metric, current.version if current else None)


def register_adapter(
    cfg: PipelineConfig, adapter_dir: str, metrics: dict[str, float], dataset_digest: str, adapter_dtype: str
) -> PromotionDecision:
    """Log the pyfunc model into the active run, register a version, tag it, and move the aliases."""
    from tasks.tracking import store_lock

    # Runs that finish together must not both see "no champion" and both take the alias (tracking.store_lock).
    with store_lock(mlflow.get_tracking_uri()):
        return _register_adapter(cfg, adapter_dir, metrics, dataset_digest, adapter_dtype)


def _register_adapter(
    cfg: PipelineConfig, adapter_dir: str, metrics: dict[str, float], dataset_digest: str, adapter_dtype: str
) -> PromotionDecision:
    from tasks.model_source import resolve_model_path, weights_digest
    from tasks.provenance import git_commit, library_versions

    name = cfg.registry.model_name or default_model_name(cfg)
    base_path = resolve_model_path(cfg.model)
    base_is_local = Path(base_path).is_dir()
    base_tags = (
        {"base_model_path": str(Path(base_path).resolve()), "base_model_digest": weights_digest(Path(base_path))}
        if base_is_local
        else {"base_model_id": base_path, "base_model_revision": cfg.model.revision or "main"}
    )
    adapter_sha = adapter_checksum(Path(adapter_dir))
    versions = library_versions()
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=QLoRAChatModel(),
        artifacts={"adapter": adapter_dir},
        code_paths=[str(REPO_ROOT / "tasks"), str(REPO_ROOT / "pipeline_config")],
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
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    base_desc = base_tags.get("base_model_id") or base_tags["base_model_path"]
    client.update_model_version(
        name, version, description=f"QLoRA adapter on {base_desc}, data {cfg.data.source} (digest {dataset_digest})."
    )
    decision = decide_champion(client, name, version, metrics.get(cfg.registry.metric), dataset_digest, cfg)
    mlflow.set_tags(
        {
            "registry.model_name": name,
            "registry.version": version,
            "registry.decision": "champion" if decision.became_champion else "challenger",
            "registry.reason": decision.reason,
        }
    )
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


@task(name="register-adapter", cache_policy=NO_CACHE, persist_result=False)
def register_adapter_task(cfg, adapter_dir, metrics, dataset_digest, adapter_dtype) -> PromotionDecision:
    """Not retried: a retry after a half-done registration would add a second version of the same run."""
    return register_adapter(cfg, adapter_dir, metrics, dataset_digest, adapter_dtype)
