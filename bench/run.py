"""`qlora-flow bench`: training speed of three QLoRA set-ups side by side, on one device or several.

    qlora-flow bench --model llama2-7b --steps 10            (GPU; results in bench-results/)
    qlora-flow bench --model tiny --device cpu --steps 3     (CI smoke run)
    qlora-flow bench --model small --data bundled --steps 300 --variants trl_best,project  (loss curves)
    qlora-flow bench --model llama2-13b --num-processes 2 --strategy fsdp --variants project_lean
                                                             (distributed: torchrun starts one bench per GPU)

With --num-processes N the command re-launches itself through torchrun: every process runs the same variants on its
own GPU with the batch settings given (they are per process), the Trainer shards the data (DDP) or the model too
(FSDP-QLoRA, `distributed.strategy: fsdp`), tokens/s is the total over all processes, and peak memory is reported
per process. Only rank 0 writes the report.

Variants (run in this order, each on a freshly 4-bit-loaded random-weight model): recipe, trl_best, project,
project_lean, project_fp32 (bench/variants.py says what each is), unsloth, unsloth_lean (bench/unsloth_variants.py).
Models and data: bench/models.py; the bench tokenizer's vocabulary, random weights, `--num-layers N` builds only N
decoder layers (a whole Mixtral is 47B parameters).

Reported per variant: real tokens/s (non-pad input tokens over the timed steps' wall time, after warm-up steps),
peak GPU memory (torch.cuda.max_memory_allocated), MFU (bench/flops.py gives the FLOPs per token), the first
steps' losses, and the loaded 4-bit weights: torch.cuda.memory_allocated() growth over the load against the size
the parameters' shapes give (`bench.memory.expected_four_bit_bytes`; the ratio shows whether a MoE's experts really
are in 4 bits). The table: bench/report.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from bench.flops import measured_matmul_tflops, peak_tflops
from bench.models import (
    architecture,
    build_model_dir,
    bundled_rows,
    default_tokenizer_dir,
    synthetic_rows,
    synthetic_tokenizer,
)
from bench.packing import packing_check
from bench.report import environment, markdown_table, ratio
from bench.settings import PROJECT_VARIANTS, UNSLOTH_VARIANTS, VARIANTS, BenchConfig
from bench.unsloth_variants import run_unsloth
from bench.variants import run_variant, world_size
from qlora.files import write_text_atomic


def run_bench(cfg: BenchConfig) -> dict:
    """Build model and data, run each variant, write bench.json + bench.md under cfg.out_dir; return the report."""
    from datasets import Dataset

    from qlora.model import pick_device

    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        from qlora.errors import PipelineInputError

        raise PipelineInputError(f"unknown bench variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    device = pick_device(cfg.device)
    if cfg.strategy == "fsdp" and cfg.num_processes > 1:
        other = [v for v in cfg.variants if v not in PROJECT_VARIANTS]
        if other:
            from qlora.errors import PipelineInputError

            raise PipelineInputError(
                f"bench --strategy fsdp measures the project's path only: drop {other} from --variants"
            )
    rank = int(os.environ.get("RANK", "0"))
    if device == "cuda" and world_size() > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # each process on its own GPU
    arch = architecture(cfg)
    # Enough rows that no process runs out within the run: a short last batch of an epoch would change the batch.
    needed_tokens = (cfg.warmup_steps + cfg.steps + cfg.profile_steps + 2) * max(cfg.tokens_per_step, 8 * 1024)
    needed_tokens *= world_size()
    if cfg.data == "bundled":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir or default_tokenizer_dir())
        rows = bundled_rows(tokenizer, n_rows=max(1000, needed_tokens // 90), seed=cfg.seed)
    else:
        tokenizer = synthetic_tokenizer(32000)
        rows = synthetic_rows(needed_tokens, 32000, cfg.seed)
    dataset = Dataset.from_dict({"input_ids": rows})
    lengths = [len(r) for r in rows]
    model_dir = build_model_dir(cfg, len(tokenizer), tokenizer.bos_token_id or 1, tokenizer.eos_token_id, device)
    matmul_tflops = measured_matmul_tflops(device)
    check = None
    if cfg.check_packing:
        try:
            check = packing_check(cfg, model_dir, tokenizer, rows, device)
        except Exception as exc:  # reported, and the speed runs still happen
            import traceback

            traceback.print_exc()
            check = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if check:
        print(f"[bench] packed vs per-document loss: {check}", file=sys.stderr, flush=True)
    results = []
    for name in cfg.variants:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name in UNSLOTH_VARIANTS:
            result = run_unsloth(name, cfg, model_dir, tokenizer, rows, device, arch, matmul_tflops)
        else:
            result = run_variant(name, cfg, model_dir, tokenizer, dataset, device, lengths, arch, matmul_tflops)
        if rank:
            continue
        if result.skipped:
            print(f"[bench] {name}: skipped ({result.skipped})", file=sys.stderr, flush=True)
        else:
            print(
                f"[bench] {name}: {result.tokens_per_s:,.0f} tokens/s, peak {result.peak_memory_gib} GiB"
                + (f" ({result.error})" if result.error else ""),
                file=sys.stderr,
                flush=True,
            )
        results.append(result)
    if rank:  # rank 0 reports for all
        return {}
    by_name = {r.name: r for r in results if not r.skipped}
    report = {
        "num_processes": world_size(),
        "strategy": cfg.strategy if world_size() > 1 else None,
        "command": "qlora-flow " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv else None,
        "model": cfg.model,
        "architecture": arch,
        "data": cfg.data,
        "rows": len(rows),
        "mean_row_tokens": sum(lengths) / len(lengths),
        "timed_steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "tokens_per_step_target": cfg.tokens_per_step,
        "environment": environment(device),
        "peak_bf16_tflops": peak_tflops(device),
        "measured_matmul_tflops": matmul_tflops,
        "flops_formula": "4*P_frozen + 6*P_lora + 12*n_layers*d_attention*sum(L(L+1)/2)/sum(L) per real token "
        "(P_frozen: the weights one token is multiplied with, for a mixture of experts its router and top_k of its "
        "experts; d_attention: query heads x head dim)",
        "packing_check": check,
        "variants": [asdict(r) for r in results],
        "ratios": {
            f"{a}/{b}": ratio(by_name.get(a), by_name.get(b))
            for a in ("project", "project_lean")
            for b in ("recipe", "trl_best", "unsloth", "unsloth_lean")
            if a in by_name and b in by_name
        },
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in (("bench.json", json.dumps(report, indent=1)), ("bench.md", markdown_table(report))):
        write_text_atomic(out / fname, text)
    return report


def launch_distributed_bench(num_processes: int, argv: list[str]) -> int:
    """Run this same bench command in `num_processes` processes through torchrun (one per GPU); rank 0's output
    is shown. No launcher of our own: torchrun sets up the process group the Trainer uses."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(num_processes)]
    cmd += ["--local-ranks-filter", "0"]
    cmd += ["-m", "flows.cli", *argv]
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    print(f"[bench] launching {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env).returncode
