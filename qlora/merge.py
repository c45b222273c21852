"""Merge a trained adapter into its base: a standalone model (safetensors, tokenizer, chat template) that plain
`AutoModelForCausalLM.from_pretrained` loads, with no peft and no bitsandbytes.

Never into 4-bit weights (users report ruined quality when a tool does): the base is loaded exactly as training
saw it, in 4-bit with the run's quantization, then de-quantized into the chosen dtype with transformers'
`dequantize` (so the merged weights are the ones the adapter was trained against, not the original
full-precision checkpoint's), then peft's `merge_and_unload` adds the LoRA product.

Before anything is written, the merged model is checked against base + adapter in 4-bit on the run's held-out
rows: eval loss within `max_loss_change_pct` (default 1 %), and greedy answers to a fixed prompt set (the first
held-out prompts) agreeing on at least `min_agreement` of them. Otherwise MergeRefused, and nothing is saved.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora.errors import PipelineInputError, Refused
from qlora.files import atomic_folder
from qlora.inference import LoadedModel

MERGE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MERGE_INFO_NAME = "merge_info.json"


class MergeRefused(Refused):
    """The merged model does not behave like base + adapter; the message says how it differs."""


@dataclass
class MergeCheck:
    reference_eval_loss: float
    merged_eval_loss: float
    loss_change_pct: float
    agreement: float  # share of the fixed prompts whose greedy answers are identical
    prompts: int
    loss_rows: int
    max_loss_change_pct: float
    min_agreement: float
    disagreements: list[dict]

    @property
    def passed(self) -> bool:
        return abs(self.loss_change_pct) <= self.max_loss_change_pct and self.agreement >= self.min_agreement

    def describe(self) -> str:
        return (
            f"eval loss {self.reference_eval_loss:.4f} (base + adapter, 4-bit) -> {self.merged_eval_loss:.4f} "
            f"(merged), {self.loss_change_pct:+.3f}% (allowed +-{self.max_loss_change_pct}%); greedy answers agree on "
            f"{self.agreement:.0%} of {self.prompts} prompts (needed {self.min_agreement:.0%})"
        )


@dataclass
class MergeResult:
    path: Path
    check: MergeCheck
    dtype: str
    seconds: float
    peak_memory_mib: float


DEFAULT_MERGE_ROOT = "outputs/merged"


def merge_target(output: str | None, run_name: str, max_loss_change_pct: float, min_agreement: float) -> Path:
    """The new folder the merged model goes to: `output`, else one named for this run under outputs/merged. Checked
    before the model loads: a path that exists or lies under a file, or check limits out of range, raise
    PipelineInputError."""
    from qlora.files import check_output_target

    if not 0 <= min_agreement <= 1 or max_loss_change_pct < 0:
        raise PipelineInputError("--min-agreement must be in [0, 1] and --max-loss-change-pct at least 0")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = Path(output) if output else Path(DEFAULT_MERGE_ROOT) / f"{stamp}-{run_name}"
    if target.exists():
        raise PipelineInputError(f"--output {target} exists: choose a new folder (nothing is overwritten)")
    check_output_target(target, "--output", is_folder=True)  # e.g. a path under a file
    return target


def held_out_rows(loaded: LoadedModel, purpose: str = "merge checks the merged model on them"):
    """The run's held-out split, formatted as the run formatted it."""
    from qlora.data import load_dataset_splits

    try:
        return load_dataset_splits(loaded.config.data)
    except Exception as exc:
        raise PipelineInputError(
            f"the run's held-out rows are needed ({purpose}), but its data {loaded.config.data.source} can't be "
            f"read: {exc}"
        ) from None


def behaviour(model, tokenizer, data, loss_rows: int, prompts: int, max_len: int) -> tuple[float, list[str], int]:
    """(eval loss over the first held-out rows, greedy answers to the first held-out prompts, rows scored)."""
    from qlora.data import eval_prompt_and_reference
    from qlora.evaluate import eval_loss, greedy_answers, scored_examples

    model.eval()
    examples = scored_examples(data, tokenizer, loss_rows, max_len)
    loss = eval_loss(model, tokenizer, examples, batch_size=8)
    rows = data.eval.select(range(min(prompts, len(data.eval))))
    asked = [p for p, _ in (eval_prompt_and_reference(r, data.kind, data.response_template) for r in rows) if p]
    return loss, greedy_answers(model, tokenizer, asked, max_new_tokens=32, batch_size=8), len(examples)


def dequantized_base(model_cfg, quant_cfg, dtype: torch.dtype, device: str):
    """A run's base as training saw it (4-bit, the run's quantization), de-quantized into `dtype`."""
    from qlora.model import dequantize_expert_parameters, load_quantized_model
    from qlora.model_source import resolve_model_source

    base = load_quantized_model(resolve_model_source(model_cfg), quant_cfg, device)
    dequantize_expert_parameters(base, dtype)  # the fused MoE experts (transformers' dequantize covers nn.Linear)
    return base.dequantize(dtype=dtype).to(dtype)


def base_model_dtype(model_cfg) -> str:
    """The merge dtype (a key of MERGE_DTYPES) the base model's weights are published in, read from its config
    (`dtype`); fp32 when it names none or another one. Merging into the base's own dtype loses nothing the base
    had, and the demo's base (converted from GGUF) is fp32, where a bf16 merge rounds away the adapter's updates."""
    from qlora.architecture import read_model_config
    from qlora.model_source import resolve_model_source

    source = resolve_model_source(model_cfg)
    config = read_model_config(model_cfg, source.path, source.gguf_file)
    published = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    by_name = {v: k for k, v in MERGE_DTYPES.items()}
    return by_name.get(published.removeprefix("torch."), "fp32")


def merged_model(base, adapter_dir: Path):
    """peft's merge of the adapter into the (de-quantized) base: a plain transformers model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def merge_adapter(
    loaded: LoadedModel,
    output_dir: Path,
    dtype: str = "auto",
    max_loss_change_pct: float = 1.0,
    min_agreement: float = 0.9,
    loss_rows: int = 32,
    prompts: int = 16,
) -> MergeResult:
    """Check, then save the merged model into `output_dir` (complete or absent). Raises MergeRefused when the
    check fails, PipelineInputError for a source that is not an adapter."""
    if loaded.kind != "adapter":
        raise PipelineInputError(f"--model {loaded.source} is already a merged model: pass an adapter to merge")
    if dtype == "auto":
        dtype = base_model_dtype(loaded.config.model)
    if dtype not in MERGE_DTYPES:
        raise PipelineInputError(f"--dtype {dtype!r}: choose one of auto, {', '.join(MERGE_DTYPES)}")
    if Path(output_dir).exists():
        raise PipelineInputError(f"--output {output_dir} exists: choose a new folder (nothing is overwritten)")
    torch_dtype = getattr(torch, MERGE_DTYPES[dtype])
    device = str(next(loaded.model.parameters()).device.type)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    data = held_out_rows(loaded)
    max_len = loaded.config.training.max_seq_length
    ref_loss, ref_answers, scored = behaviour(loaded.model, loaded.tokenizer, data, loss_rows, prompts, max_len)
    loaded.model = None  # the 4-bit reference is not needed any more: free it before the full-precision copy
    if device == "cuda":
        torch.cuda.empty_cache()
    base = dequantized_base(loaded.config.model, loaded.config.quantization, torch_dtype, device)
    merged = merged_model(base, loaded.adapter_dir)
    loss, answers, _ = behaviour(merged, loaded.tokenizer, data, loss_rows, prompts, max_len)
    check = MergeCheck(
        reference_eval_loss=ref_loss,
        merged_eval_loss=loss,
        loss_change_pct=100.0 * (loss - ref_loss) / ref_loss if ref_loss else 0.0,
        agreement=sum(a == b for a, b in zip(ref_answers, answers, strict=True)) / max(len(answers), 1),
        prompts=len(answers),
        loss_rows=scored,
        max_loss_change_pct=max_loss_change_pct,
        min_agreement=min_agreement,
        disagreements=[
            {"base_plus_adapter": a, "merged": b} for a, b in zip(ref_answers, answers, strict=True) if a != b
        ][:5],
    )
    if not check.passed:
        hint = ""
        if abs(check.loss_change_pct) > max_loss_change_pct and dtype != "fp32":
            hint = (
                f"; {dtype} rounds away part of the adapter's small updates when they are added to the weights: "
                "--dtype fp32 keeps them"
            )
        raise MergeRefused(f"the merged model does not behave like base + adapter: {check.describe()}; not saved{hint}")
    info = {
        "source": loaded.source,
        "adapter_dir": str(loaded.adapter_dir),
        "base_model": loaded.config.model.model_dump(mode="json"),
        "quantization": loaded.config.quantization.model_dump(mode="json"),
        "dtype": MERGE_DTYPES[dtype],
        "check": asdict(check) | {"passed": True},
        **({"registry": loaded.info} if loaded.info else {}),
    }
    with atomic_folder(Path(output_dir)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)  # with its chat template
        (tmp / MERGE_INFO_NAME).write_text(json.dumps(info, indent=1))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mib()
    return MergeResult(Path(output_dir), check, MERGE_DTYPES[dtype], time.perf_counter() - started, peak)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
