"""Throughput of the stages after SFT on a GPU: DPO pairs and tokens per second, GRPO completions per second, through
the project's stage trainer (qlora/stages.py: the run's TrainingArguments, atomic checkpoints off here, the 4-bit
model from qlora/model.py) against TRL's trainer with its own defaults (DPOConfig / GRPOConfig with only the batch,
length, step count and bf16 set), on the same 4-bit model, LoRA settings and rows.

    python -m bench.stage_speed --tokenizer-dir /tmp/tokpack --out /tmp/out/stage-speed.json

The model is the bench's Llama-2-7B shape with random weights (bench/models.py); the rows are the bundled orders
(bundled:orders-preference and bundled:orders-prompts: chat prompts of ~60 tokens, answers of ~30). GRPO's
completions run to max_completion_length (random weights rarely stop early), so samples/s is generation-bound.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


class StepTimes(TrainerCallback):
    """Wall time of every optimizer step (after a CUDA sync)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def _timed(trainer, warmup: int) -> dict:
    times = StepTimes()
    trainer.add_callback(times)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = len(times.ends) - 1
    timed = times.ends[-1] - times.ends[warmup]
    seen = [h for h in trainer.state.log_history if "num_input_tokens_seen" in h]
    return {
        "steps": steps,
        "timed_steps": steps - warmup,
        "s_per_step": timed / (steps - warmup),
        "tokens_seen": seen[-1]["num_input_tokens_seen"] if seen else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/bench-models")
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="DPO pairs / GRPO completions per step")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--only", action="append", default=[], help="dpo or grpo (repeatable)")
    parser.add_argument(
        "--project-checkpointing",
        action="append",
        choices=["off", "on"],
        default=[],
        help="the project's variant with training.gradient_checkpointing off / on (repeatable; default: the config's)",
    )
    parser.add_argument("--out", default="stage-speed.json")
    args = parser.parse_args()

    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    from bench.models import build_model_dir
    from bench.settings import BenchConfig
    from pipeline_config.schema import PipelineConfig
    from qlora.data import load_dataset_splits
    from qlora.model import build_lora_config, load_quantized_model
    from qlora.model_source import resolve_model_source
    from qlora.rewards import build_reward
    from qlora.stages import build_stage_trainer
    from qlora.train import trainer_arguments

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    bench_cfg = BenchConfig(model="llama2-7b", model_dir=args.model_dir)
    model_dir = build_model_dir(bench_cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, "cuda")
    tokenizer.save_pretrained(model_dir)
    out_dir = Path("/tmp/stage-speed-runs")
    report = {"gpu": torch.cuda.get_device_name(), "batch_size": args.batch_size, "variants": {}}

    def pipeline_config(method: str, source: str) -> PipelineConfig:
        return PipelineConfig(
            model={"name_or_path": str(model_dir)},
            quantization={"compute_dtype": "bfloat16"},
            data={"source": source, "max_train_rows": 400},
            training={
                "method": method,
                "max_steps": args.steps,
                "per_device_train_batch_size": args.batch_size,
                "bf16": True,
                "logging_steps": 1,
                "save_steps": 0,
                "max_seq_length": 512,
                "device": "cuda",
            },
            grpo={"num_generations": args.num_generations, "max_completion_length": args.max_completion_length},
            tracking={"tracking_uri": "sqlite:////tmp/stage-speed-mlflow.db"},
        )

    def base_model(cfg: PipelineConfig):
        return load_quantized_model(resolve_model_source(cfg.model), cfg.quantization, "cuda")

    def lora(cfg):
        return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules="all-linear", task_type="CAUSAL_LM")

    warmed = False
    for method, source in (("dpo", "bundled:orders-preference"), ("grpo", "bundled:orders-prompts")):
        if args.only and method not in args.only:
            continue
        cfg = pipeline_config(method, source)
        data = load_dataset_splits(cfg.data)
        measure = {"include_num_input_tokens_seen": "non_padding"}  # counting only; the step is the same
        # the project's stage trainer, as a flow run builds it; the first training of a process is slower (3x
        # measured, after two warm-up steps), so the process's first variant runs once untimed first
        variants = args.project_checkpointing or [None]
        for n, checkpointing in enumerate(variants if warmed else variants[:1] + variants):
            training = cfg.training
            if checkpointing is not None:
                training = training.model_copy(update={"gradient_checkpointing": checkpointing == "on"})
            model = base_model(cfg)
            train_args = trainer_arguments(training, "cuda", str(out_dir / f"{method}-project")) | measure
            trainer = build_stage_trainer(
                method, model, data, tokenizer, cfg, train_args, build_lora_config(cfg.lora, model), []
            )
            label = f"{method}/project" + (f" (gradient checkpointing {checkpointing})" if checkpointing else "")
            result = _timed(trainer, args.warmup)
            if warmed or n > 0:
                report["variants"][label] = result
            del trainer, model
            torch.cuda.empty_cache()
        warmed = True
        # TRL's trainer with its own defaults (only batch, lengths, steps and bf16 set)
        model = base_model(cfg)
        common = dict(
            output_dir=str(out_dir / f"{method}-trl"),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            bf16=True,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            **measure,
        )
        if method == "dpo":
            trainer = DPOTrainer(
                model=model,
                args=DPOConfig(**common, max_length=512),
                train_dataset=data.train,
                processing_class=tokenizer,
                peft_config=lora(cfg),
            )
        else:
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=[build_reward(r) for r in cfg.grpo.rewards],
                args=GRPOConfig(
                    **common,
                    num_generations=args.num_generations,
                    max_completion_length=args.max_completion_length,
                ),
                train_dataset=data.train,
                processing_class=tokenizer,
                peft_config=lora(cfg),
            )
        report["variants"][f"{method}/trl defaults"] = _timed(trainer, args.warmup)
        del trainer, model
        torch.cuda.empty_cache()
    for label, result in report["variants"].items():
        per_s = args.batch_size / result["s_per_step"]
        result["pairs_per_s" if label.startswith("dpo") else "completions_per_s"] = per_s
        if result["tokens_seen"]:
            result["tokens_per_s_approx"] = result["tokens_seen"] / result["steps"] / result["s_per_step"]
        print(label, json.dumps(result), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
