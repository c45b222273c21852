"""The variants the bench compares, each a PipelineConfig and a way to train it, and `run_variant`, which measures
one of them.

  recipe       the original recipe's settings through plain TRL SFTTrainer (pipeline_config/llama2-7b-chat-guanaco.yaml)
  trl_best     TRL's best-known QLoRA settings: bf16, all-linear r=16, bfd packing (padding-free), Liger kernels,
               gradient checkpointing, batch 8 x 2048
  project      this project's training path as the flow runs it (qlora.model + qlora.train), fast defaults
  project_lean the same with the one lean switch: training.gradient_checkpointing=true
  project_fp32 the same with lora.upcast_base_to_fp32=true (for the loss-curve check of skipping the up-casts)

The unsloth variants run in a process of their own: bench/unsloth_variants.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.flops import architecture_params, attention_width, flops_per_token, linear_params, peak_tflops
from bench.memory import free_accelerator_memory, measure_load
from bench.models import architecture, is_moe, needs_eager_attention
from bench.settings import BenchConfig
from bench.timing import StepTimer, summarize_profile
from qlora.distributed import gather_per_rank
from qlora.integrations.liger import restore_llama_rope


@dataclass
class VariantResult:
    name: str
    settings: dict
    tokens_per_s: float = 0.0
    step_time_s: float = 0.0
    tokens_per_step: float = 0.0
    peak_memory_gib: float | None = 0.0  # None on the CPU (no per-variant peak there)
    peak_reserved_gib: float = 0.0
    mfu: float | None = None
    mfu_of_measured_matmul: float | None = None
    first_losses: list[float] = field(default_factory=list)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    final_loss: float | None = None  # mean of the last 10% of logged losses
    profile: dict | None = None
    error: str | None = None
    skipped: str | None = None  # why the variant did not run (not a failure: e.g. no Unsloth environment)
    # the loaded 4-bit model's weights (project's loader): memory_allocated growth over the load (CUDA), the size
    # its parameters' shapes give (`expected_four_bit_bytes`), and their ratio
    weights_bytes: int | None = None
    four_bit_size_bytes: int | None = None
    weights_vs_four_bit: float | None = None
    load_peak_bytes: int | None = None  # the most allocated while loading (16-bit experts held at once show here)


def _bench_training(cfg: BenchConfig, device: str) -> dict:
    """Training settings every variant shares: the step count, a log line per step, no saving, the seed."""
    return {
        "max_steps": cfg.warmup_steps + cfg.steps + cfg.profile_steps,
        "learning_rate": cfg.learning_rate,
        "logging_steps": 1,
        "save_steps": 0,
        "resume": "never",
        "seed": cfg.seed,
        "device": device,
    }


def recipe_config(cfg: BenchConfig, model_dir: Path, out_dir: str, device: str):
    """The original recipe: pipeline_config/llama2-7b-chat-guanaco.yaml itself, on the bench's model and steps."""
    from pipeline_config.loading import CONFIG_DIR, load_pipeline_config

    overrides = {f"training.{k}": v for k, v in _bench_training(cfg, device).items()}
    overrides |= {"model.name_or_path": str(model_dir), "data.source": "bench:synthetic"}
    overrides["training.output_dir"] = out_dir
    if device != "cuda":
        overrides["training.optim"] = "adamw_torch"  # paged optimizers need CUDA
    if needs_eager_attention(architecture(cfg)):
        overrides["training.attention"] = "eager"
    return load_pipeline_config(CONFIG_DIR / "llama2-7b-chat-guanaco.yaml", overrides)


def trl_best_config(cfg: BenchConfig, model_dir: Path, out_dir: str, device: str):
    """TRL's documented best QLoRA settings (SFT docs: packing + padding-free, Liger, bf16, checkpointing)."""
    from pipeline_config.loading import load_pipeline_config

    bf16 = device == "cuda" or torch.cpu._is_avx512_bf16_supported()
    # Dropout 0.05, except on a mixture of experts: there peft's 'all-linear' also wraps the router's weight in a
    # ParamWrapper, which refuses any dropout ("lora.ParamWrapper does not work with lora_dropout != 0").
    dropout = 0.0 if is_moe(architecture(cfg)) else 0.05
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"compute_dtype": "bfloat16", "double_quant": True, "quant_storage_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32, "dropout": dropout, "target_modules": "all-linear"},
        "data": {"source": "bench:synthetic"},
        "training": {
            **_bench_training(cfg, device),
            "output_dir": out_dir,
            "per_device_train_batch_size": max(1, cfg.tokens_per_step // cfg.seq_len),
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": True,
            "max_seq_length": cfg.seq_len,
            "packing": True,
            "packing_strategy": "bfd",
            "bf16": bf16,
            "liger_kernels": "auto",
            # flash-attn is not installable offline; the Hub kernels need network. Eager where SDPA cannot compute
            # the family's attention (Gemma 2's soft-capping), as transformers itself picks.
            "attention": "eager" if needs_eager_attention(architecture(cfg)) else "sdpa",
            "fused_lora": False,
            "optim": "adamw_torch",
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.03,
        },
    }
    return load_pipeline_config(raw)


def run_plain_trl(pipeline_cfg, tokenizer, dataset, device, timer, weights: dict | None = None):
    """Variants (1) and (2): the project's loader and LoRA/SFT settings builders, then plain trl.SFTTrainer: none of
    the project's training code (no varlen attention, fused LoRA, partial checkpointing or atomic checkpoints).
    `weights` gets the loaded model's weight sizes (`measure_load`). Liger's kernels are off for a family they do
    not train correctly under peft (mixture-of-experts), as the project's trainer does."""
    from trl import SFTTrainer

    from qlora.model import build_lora_config, load_base_for_training
    from qlora.model_source import resolve_model_source
    from qlora.train import build_sft_config, liger_unsupported, loss_history, use_liger_kernels

    t = pipeline_cfg.training
    source = resolve_model_source(pipeline_cfg.model)
    model, loaded = measure_load(lambda: load_base_for_training(source, pipeline_cfg, device), device)
    if weights is not None:
        weights.update(loaded)
    overrides = {"disable_tqdm": True}
    if use_liger_kernels(t.liger_kernels, device) and (reason := liger_unsupported(model.config)):
        overrides["use_liger_kernel"] = False
        if weights is not None:
            weights["liger_off"] = reason
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(t, device, t.output_dir, **overrides),
        train_dataset=dataset,
        peft_config=build_lora_config(pipeline_cfg.lora),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return trainer.model, loss_history(trainer), trainer


def project_config(cfg: BenchConfig, model_dir: Path, out_dir: str, device: str, extra: tuple[str, ...] = ()):
    """The PipelineConfig the project variants train with: the schema's fast defaults plus the bench's batch
    geometry, validated exactly like a flow run's config (so `--project-set` typos fail the same way)."""
    from pipeline_config.loading import load_pipeline_config

    micro_rows = max(1, cfg.project_micro_batch_tokens // cfg.seq_len)
    accumulation = max(1, cfg.tokens_per_step // (micro_rows * cfg.seq_len))
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"compute_dtype": "bfloat16", "double_quant": True},
        "data": {"source": "bench:synthetic"},
        "training": {
            **_bench_training(cfg, device),
            "output_dir": out_dir,
            "per_device_train_batch_size": micro_rows,
            "gradient_accumulation_steps": accumulation,
            "max_seq_length": cfg.seq_len,
            "warmup_ratio": 0.03,
        },
    }
    if cfg.num_processes > 1:
        raw["distributed"] = {"num_processes": cfg.num_processes, "strategy": cfg.strategy}
        if cfg.strategy == "fsdp":  # FSDP shards the 4-bit weights only when they are stored in the compute dtype
            raw["quantization"]["quant_storage_dtype"] = "bfloat16"
            raw["training"]["bf16"] = True  # FSDP casts each layer's gathered weights to the compute dtype
    return load_pipeline_config(raw, [*extra, *cfg.project_overrides])


def run_project(cfg, pipeline_cfg, tokenizer, dataset, device, timer, weights: dict | None = None):
    """Variant (3): exactly the flow's load-quantized-model -> train-adapter functions; `weights` gets the loaded
    model's weight sizes (`measure_load`)."""
    from qlora.data import DatasetSplits
    from qlora.model import load_base_for_training
    from qlora.model_source import resolve_model_source
    from qlora.train import train_adapter

    t = pipeline_cfg.training
    source = resolve_model_source(pipeline_cfg.model)
    model, loaded = measure_load(lambda: load_base_for_training(source, pipeline_cfg, device), device)
    if weights is not None:
        weights.update(loaded)
    splits = DatasetSplits(train=dataset, eval=dataset.select(range(1)), kind="text", digest="bench", source="bench")
    fsdp = pipeline_cfg.distributed.strategy == "fsdp" and world_size() > 1
    result = train_adapter(
        model, splits, tokenizer, pipeline_cfg.lora, t, device, extra_callbacks=[timer], fsdp=fsdp, disable_tqdm=True
    )
    if fsdp:
        shares = gather_per_rank(result.metrics["fsdp_local_parameter_share"])  # every rank takes part
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[bench] FSDP: share of the parameters each process holds: {shares}", file=sys.stderr, flush=True)
        check_adapter_reloads(pipeline_cfg, result, device)
    return result.model, result.loss_history, None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_adapter_reloads(pipeline_cfg, result, device: str) -> None:
    """FSDP: the adapter gathered from the shards is one ordinary PEFT adapter: rank 0 saves it and loads it back
    onto the 4-bit base on its one GPU with `PeftModel.from_pretrained`, and the weights must be the ones trained."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from qlora.model import load_base_for_training, load_trained_adapter
    from qlora.model_source import resolve_model_source
    from qlora.train import save_trained_adapter

    folder = tempfile.mkdtemp(prefix="qlora-bench-adapter-")
    try:
        save_trained_adapter(result, folder)
        trained = {k: v.float() for k, v in result.adapter_state_dict.items()}
        base = load_base_for_training(resolve_model_source(pipeline_cfg.model), pipeline_cfg, device)
        reloaded = load_trained_adapter(base, folder, result.adapter_dtype)
        loaded = {k: p.detach().float().cpu() for k, p in reloaded.named_parameters() if "lora_" in k}
        if loaded.keys() != trained.keys():
            raise RuntimeError(
                f"the FSDP adapter reloaded with other LoRA tensors: {sorted(loaded.keys() ^ trained.keys())[:4]}"
            )
        diffs = [(loaded[k] - v).abs().max().item() for k, v in trained.items()]
        print(
            f"[bench] FSDP adapter reloaded with PeftModel.from_pretrained on one GPU: {len(loaded)} LoRA tensors, "
            f"max |reloaded - trained| = {max(diffs):.3g}",
            file=sys.stderr,
            flush=True,
        )
        if max(diffs) > 0:
            raise RuntimeError("the FSDP adapter did not reload with the trained weights")
        del reloaded, base
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        free_accelerator_memory()


PROJECT_EXTRA = {
    "project": (),
    "project_lean": ("training.gradient_checkpointing=true",),
    "project_fp32": ("lora.upcast_base_to_fp32=true",),
}


def run_variant(
    name: str, cfg: BenchConfig, model_dir: Path, tokenizer, dataset, device: str, lengths, arch, matmul_tflops
):
    profile = cfg.profile_steps if name == "project" else 0
    timer = StepTimer(cfg.warmup_steps, cfg.steps, device, profile)
    bench_cfg = BenchConfig(**{**asdict(cfg), "profile_steps": profile})
    out_dir = tempfile.mkdtemp(prefix=f"qlora-bench-{name}-")
    weights: dict = {}
    free_accelerator_memory()
    try:
        with restore_llama_rope():
            if name == "recipe":
                pcfg = recipe_config(bench_cfg, model_dir, out_dir, device)
            elif name == "trl_best":
                pcfg = trl_best_config(bench_cfg, model_dir, out_dir, device)
            else:
                pcfg = project_config(bench_cfg, model_dir, out_dir, device, PROJECT_EXTRA[name])
            if name in ("recipe", "trl_best"):
                model, losses, trainer = run_plain_trl(pcfg, tokenizer, dataset, device, timer, weights)
            else:
                model, losses, trainer = run_project(bench_cfg, pcfg, tokenizer, dataset, device, timer, weights)
            t = pcfg.training
            shown = {
                "lora": pcfg.lora.model_dump(mode="json"),
                "quantization": pcfg.quantization.model_dump(mode="json"),
                "training": {
                    k: getattr(t, k)
                    for k in (
                        "per_device_train_batch_size",
                        "gradient_accumulation_steps",
                        "max_seq_length",
                        "packing",
                        "packing_strategy",
                        "attention",
                        "liger_kernels",
                        "fused_lora",
                        "gradient_checkpointing",
                        "gradient_checkpointing_layers",
                        "bf16",
                        "optim",
                    )
                },
            }
        if weights.get("liger_off"):
            shown["training"]["liger_kernels"] = f"off: {weights['liger_off']}"
        result = VariantResult(name=name, settings=shown)
        result.weights_bytes = weights.get("weights_bytes")
        result.four_bit_size_bytes = weights.get("four_bit_size_bytes")
        result.weights_vs_four_bit = weights.get("weights_vs_four_bit")
        result.load_peak_bytes = weights.get("load_peak_bytes")
        timed = timer.t1 - timer.t0
        tokens = timer.tokens1 - timer.tokens0
        result.tokens_per_s = tokens / timed if timed > 0 else 0.0
        result.step_time_s = timed / cfg.steps
        result.tokens_per_step = tokens / cfg.steps
        peaks = gather_per_rank(timer.peak / 2**30)
        result.peak_memory_gib = max(peaks) if device == "cuda" else None
        result.peak_reserved_gib = max(gather_per_rank(timer.reserved / 2**30))
        if len(peaks) > 1:
            result.settings["peak_memory_gib_per_rank"] = [round(p, 2) for p in peaks]
        # FLOPs per token from the architecture (under FSDP the local model holds only shards)
        frozen, lora = linear_params(model) if len(peaks) == 1 else architecture_params(arch, pcfg.lora.r)
        fpt = flops_per_token(frozen, lora, arch["num_hidden_layers"], attention_width(arch), lengths)
        peak = peak_tflops(device)
        gpus = len(peaks)  # MFU per GPU: tokens/s is the total over the processes
        if peak:
            result.mfu = result.tokens_per_s * fpt / (peak * 1e12 * gpus)
        if matmul_tflops:
            result.mfu_of_measured_matmul = result.tokens_per_s * fpt / (matmul_tflops * 1e12 * gpus)
        result.settings["flops_per_token"] = fpt
        result.loss_history = losses
        result.first_losses = [round(loss, 4) for _, loss in losses[:5]]
        tail = [loss for _, loss in losses[-max(1, len(losses) // 10) :]]
        result.final_loss = sum(tail) / len(tail)
        if timer.profiler is not None:
            result.profile = summarize_profile(timer.profiler)
        del model, trainer
    except torch.cuda.OutOfMemoryError as exc:
        result = VariantResult(name=name, settings={}, error=f"CUDA out of memory: {str(exc).splitlines()[0]}")
    except Exception as exc:  # one broken variant must not cost the others' measurements
        import traceback

        traceback.print_exc()
        result = VariantResult(name=name, settings={}, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        free_accelerator_memory()
    return result
