"""Use a trained model: load it from wherever it lives, and generate from it (the CLI's generate, chat, compare and
merge all start here).

A model SOURCE is one of:
- an adapter folder (`adapter_config.json`), e.g. a run's `outputs/.../adapter`: the base is loaded in 4-bit with
  the flow's own loader and the run's quantization (from the folder's `pipeline_config.yaml`), then the adapter in
  the dtype it was trained in: the numerics the run evaluated and the registry serves;
- an MLflow model URI (`models:/NAME@champion`, `models:/NAME/3`, `runs:/ID/model`): an adapter model this project
  registered is downloaded and loaded as its adapter folder; a transformers-flavor model (a merged model registered
  by the merge flow) is loaded as a merged model;
- a merged model folder (`config.json`, no adapter): plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora.errors import PipelineInputError

MODEL_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick tokens: temperature 0 is greedy (top_p then unused)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise PipelineInputError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise PipelineInputError("--temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise PipelineInputError("--top-p must be in (0, 1]")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass
class LoadedModel:
    """A model ready to generate, and what it is."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    kind: str  # 'adapter' (4-bit base + LoRA, a PeftModel) or 'merged' (a standalone model)
    adapter_dir: Path | None = None  # the adapter folder (kind 'adapter')
    config: object = None  # the run's PipelineConfig (kind 'adapter')
    info: dict = field(default_factory=dict)  # registry / merge metadata where known

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def is_model_uri(source: str) -> bool:
    return source.startswith(MODEL_URI_SCHEMES)


def adapter_dtype_of(adapter_dir: Path) -> str:
    """The dtype the adapter's weights were saved in (the dtype they were trained in)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as weights:
        name = next(iter(weights.keys()))
        return (
            str(weights.get_slice(name).get_dtype())
            .lower()
            .replace("bf16", "bfloat16")
            .replace("f32", "float32")
            .replace("f16", "float16")
        )


def load_adapter_folder(adapter_dir: Path, source: str, device: str | None = None) -> LoadedModel:
    """4-bit base (the flow's loader, the run's settings) + the adapter of a run's adapter folder."""
    from transformers import AutoTokenizer

    from pipeline_config.loading import load_pipeline_config
    from qlora.model import load_quantized_model, load_trained_adapter, pick_device
    from qlora.model_source import resolve_model_source
    from qlora.save import RESOLVED_CONFIG_NAME, verify_adapter_dir

    if not (adapter_dir / RESOLVED_CONFIG_NAME).is_file():
        raise PipelineInputError(f"{adapter_dir} has no {RESOLVED_CONFIG_NAME}: pass the adapter folder of a flow run")
    verify_adapter_dir(adapter_dir)
    cfg = load_pipeline_config(adapter_dir / RESOLVED_CONFIG_NAME)
    device = device or pick_device("auto")
    base = load_quantized_model(
        resolve_model_source(cfg.model),
        cfg.quantization,
        device,
        upcast_base_to_fp32=cfg.lora.upcast_base_to_fp32,
    )
    model = load_trained_adapter(base, adapter_dir, adapter_dtype_of(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    return LoadedModel(model, tokenizer, source, "adapter", adapter_dir=adapter_dir, config=cfg)


def load_merged_folder(folder: Path, source: str, device: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.model import pick_device

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map={"": device or pick_device("auto")})
    info_path = folder / "merge_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return LoadedModel(model.eval(), AutoTokenizer.from_pretrained(folder), source, "merged", info=info)


def load_for_inference(source: str, tracking_uri: str | None = None, device: str | None = None) -> LoadedModel:
    """Load SOURCE (see the module docstring). Raises PipelineInputError naming what SOURCE should be."""
    if is_model_uri(source):
        return _load_model_uri(source, tracking_uri, device)
    path = Path(source)
    if (path / "adapter_config.json").is_file():
        return load_adapter_folder(path, source, device)
    if (path / "config.json").is_file():
        return load_merged_folder(path, source, device)
    what = "a folder with neither adapter_config.json nor config.json" if path.is_dir() else "not found"
    raise PipelineInputError(
        f"--model {source}: {what}. Pass an adapter folder (outputs/<run>/adapter), a merged model folder, or an "
        "MLflow model URI (models:/NAME@champion, models:/NAME/VERSION, runs:/RUN_ID/model)"
    )


def _load_model_uri(uri: str, tracking_uri: str | None, device: str | None) -> LoadedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file, 40 files: noise
    target = Path(tempfile.mkdtemp(prefix="qlora-model-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)  # the adapter folder is read again by merge
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except MlflowException as exc:
        raise PipelineInputError(f"--model {uri}: {exc.message.splitlines()[0]}") from None
    mlmodel = _read_mlmodel(local)
    flavors = mlmodel.get("flavors", {})
    if "transformers" in flavors:
        components = mlflow.transformers.load_model(str(local), return_type="components")
        shutil.rmtree(target, ignore_errors=True)  # in memory now; a merged model's copy can be gigabytes
        model = components["model"].eval()
        if device:
            model.to(device)
        return LoadedModel(model, components["tokenizer"], uri, "merged", info=mlmodel.get("metadata") or {})
    adapter = local / "artifacts" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise PipelineInputError(f"--model {uri}: neither a QLoRA adapter model nor a transformers model")
    loaded = load_adapter_folder(adapter, uri, device)
    loaded.info = mlmodel.get("flavors", {}).get("python_function", {}).get("model_config", {}) or {}
    return loaded


def _read_mlmodel(local: Path) -> dict:
    import yaml

    path = local / "MLmodel"
    if not path.is_file():
        raise PipelineInputError(f"{local}: no MLmodel file: not an MLflow model")
    return yaml.safe_load(path.read_text())


# ----------------------------------------------------------------------------------------------------- prompts


def as_prompt(item, has_chat_template: bool):
    """A string (a user turn when the model has a chat template) or a chat (a list of role/content turns)."""
    if isinstance(item, str):
        return [{"role": "user", "content": item}] if has_chat_template else item
    return [dict(turn) for turn in item]


def is_answers_file(path: Path) -> bool:
    """True for a JSONL file of rows that each carry an `output` (what `generate --prompts` writes, and what its
    `--overwrite` may replace)."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return bool(rows) and all(isinstance(r, dict) and "output" in r for r in rows)


def read_prompts_file(path: Path) -> list[dict]:
    """JSONL rows with a `prompt` (string) or `messages` (chat turns) field. Raises PipelineInputError naming the
    line."""
    if not path.is_file():
        raise PipelineInputError(f"--prompts {path}: file not found")
    from qlora.data import json_lines

    def not_json(number: int, reason: str) -> PipelineInputError:
        return PipelineInputError(f"--prompts {path}: line {number} is not valid JSON ({reason})")

    rows = []
    for number, row in json_lines(path, not_json):
        prompt = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
        chat = isinstance(prompt, list) and prompt and all(isinstance(t, dict) and "content" in t for t in prompt)
        if not (isinstance(prompt, str) or chat):
            raise PipelineInputError(
                f"--prompts {path}: line {number} needs a 'prompt' string or a 'messages' list of "
                "{'role', 'content'} turns"
            )
        rows.append(row)
    if not rows:
        raise PipelineInputError(f"--prompts {path}: no prompts in the file")
    return rows


# -------------------------------------------------------------------------------------------------- generation


@torch.inference_mode()
@contextlib.contextmanager
def without_router_aux_loss(model) -> Iterator[None]:
    """Generation needs no load-balancing loss of a mixture-of-experts router, and transformers computes it wrongly
    for a padded batch while decoding (a shape error at the first new token, measured on Mixtral and Qwen3-MoE
    after training switched `output_router_logits` on)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "output_router_logits", False):
        yield
        return
    config.output_router_logits = False
    try:
        yield
    finally:
        config.output_router_logits = True


def generate_texts(
    model,
    tokenizer,
    prompts: list,
    settings: SamplingSettings,
    batch_size: int = 8,
    streamer=None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers for chat or string prompts, batched with left padding (a batch's answers equal one-by-one's under
    greedy decoding). `streamer` (transformers' TextStreamer) prints tokens as they come: one prompt at a time.
    `on_batch(n)` is called after each batch with its size (a progress bar)."""
    if settings.seed is not None:
        from transformers import set_seed

        set_seed(settings.seed)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            if isinstance(chunk[0], list):
                enc = tokenizer.apply_chat_template(
                    chunk, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
                )
            else:
                enc = tokenizer(chunk, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            with without_router_aux_loss(model):
                out = model.generate(
                    **enc,
                    max_new_tokens=settings.max_new_tokens,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    streamer=streamer,
                    **settings.generate_kwargs(),
                )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            if on_batch:
                on_batch(len(chunk))
    finally:
        tokenizer.padding_side = side
    return answers
