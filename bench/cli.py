"""`qlora-flow bench`: the benchmark's command line, a sub-command that flows/cli.py adds.

    add_bench_command(subparsers, parents)   the `bench` parser; its handler is `bench_command`
    bench_command(args) -> int               run the variants (bench.json, bench.md) or --max-context

Only bench/settings.py is imported here (no torch), so that `qlora-flow --help` stays fast; the bench itself loads
when the command runs. Flags out of range raise PipelineInputError (exit code 2 in flows/cli.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from bench.settings import ARCHITECTURES, DEFAULT_VARIANTS, GEOMETRY, VARIANTS, BenchConfig
from qlora.errors import PipelineInputError


def add_bench_command(subparsers, parents: list[argparse.ArgumentParser]) -> None:
    """Add the `bench` sub-command to `subparsers` (`parents` carry the flags every command shares, --debug);
    the parsed arguments' `handler` is `bench_command`."""
    d = BenchConfig()
    p = subparsers.add_parser(
        "bench", parents=parents, help="training speed of the original recipe, TRL's best settings and this project"
    )
    p.add_argument(
        "--model",
        choices=sorted(ARCHITECTURES),
        default=d.model,
        help="architecture: a model's shape with random weights and the bench tokenizer's vocabulary "
        "(bench/settings.py; mixture of experts: mixtral-8x7b, qwen3-30b-a3b, tiny-moe)",
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=d.device)
    p.add_argument("--steps", type=int, default=d.steps, help="timed optimizer steps per variant")
    geometry = "default per --model: 2048 / 16384 / 8192 / 2 (tiny, tiny-moe: 1024 / 2048 / 1024 / 1)"
    p.add_argument("--warmup-steps", type=int, default=None, help=f"untimed steps first ({geometry}, last)")
    p.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}"
    )
    p.add_argument("--data", choices=["synthetic", "bundled"], default=d.data, help="rows to train on")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer for --data bundled (default: the default model's)")
    p.add_argument("--seq-len", type=int, default=None, help=f"packed row length ({geometry}, first)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="packed tokens per optimizer step")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="the project variants' micro-batch tokens")
    p.add_argument("--check-packing", action="store_true", help="first compare packed vs per-document loss")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument(
        "--project-set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a project setting"
    )
    p.add_argument("--profile-steps", type=int, default=0, help="profile this many steps of the project variant")
    p.add_argument(
        "--num-processes", type=int, default=1, help="training processes (GPUs), through torchrun; batch per process"
    )
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default=d.strategy, help="with several processes")
    p.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="build only this many of the model's decoder layers (the 70B width or a whole MoE does not fit one GPU)",
    )
    p.add_argument(
        "--unsloth-site",
        default=None,
        metavar="DIR",
        help="packages with Unsloth for the unsloth variants' own process (../shared/gpu/unsloth/build-unsloth-site.sh;"
        " default $QLORA_BENCH_UNSLOTH_SITE); without one those variants are skipped",
    )
    p.add_argument("--unsloth-python", default=None, help="Python for the unsloth variants (default: this one)")
    p.add_argument(
        "--max-context",
        action="store_true",
        help="instead of the variants: the longest single document the lean path trains on, with its memory curve",
    )
    p.add_argument(
        "--context-lengths",
        default=None,
        metavar="N,N,...",
        help="--max-context: document lengths to try in ascending order (default 32k to 512k)",
    )
    p.add_argument("--model-dir", default=d.model_dir, help="where random-weight models are built and reused")
    p.add_argument("--out-dir", default=d.out_dir, help="bench.json and bench.md go here")
    p.set_defaults(handler=bench_command)


def bench_command(args) -> int:
    """Run the bench as its parsed flags say: the variants, written to bench.json and bench.md under --out-dir
    (re-launched through torchrun with --num-processes above 1), or --max-context. Returns 0, or 1 when a variant
    failed (--max-context: when no length trained). Raises PipelineInputError for flags out of range."""
    cfg = _bench_config(args)
    if cfg.steps < 1 or cfg.warmup_steps < 1:
        raise PipelineInputError("bench: --steps and --warmup-steps must be at least 1")
    if cfg.num_processes < 1 or (cfg.num_layers is not None and cfg.num_layers < 1):
        raise PipelineInputError("bench: --num-processes and --num-layers must be at least 1")
    if args.max_context:
        return _max_context_command(args, cfg)
    if cfg.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        from bench.run import launch_distributed_bench

        return launch_distributed_bench(cfg.num_processes, sys.argv[1:])
    from bench.report import markdown_table
    from bench.run import run_bench

    report = run_bench(cfg)
    if not report:  # a distributed bench's other ranks: rank 0 reports
        return 0
    print(markdown_table(report), end="")
    print(f"written: {args.out_dir}/bench.json, {args.out_dir}/bench.md")
    return 0 if not any(v["error"] for v in report["variants"]) else 1


def _batch_geometry(args) -> dict:
    """seq_len, tokens_per_step, project_micro_batch_tokens and warmup_steps: each flag given, else the model's
    GEOMETRY entry, else BenchConfig's default."""
    defaults = BenchConfig()
    geometry = {k: getattr(defaults, k) for k in GEOMETRY["tiny"]} | GEOMETRY.get(args.model, {})
    flags = {"project_micro_batch_tokens": args.micro_batch_tokens}
    flags |= {k: getattr(args, k) for k in ("seq_len", "tokens_per_step", "warmup_steps")}
    return geometry | {k: v for k, v in flags.items() if v is not None}


def _bench_config(args) -> BenchConfig:
    """One bench invocation's settings from its command line (both the variants and --max-context read them): each
    BenchConfig field from the flag of its name, then the batch geometry, the variants list and --project-set."""
    named = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig) if hasattr(args, f.name)}
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    rest = {"variants": variants, "project_overrides": tuple(args.project_set)}
    return BenchConfig(**named | _batch_geometry(args) | rest)


def _max_context_command(args, cfg: BenchConfig) -> int:
    from bench.long_context import DEFAULT_LENGTHS, markdown, run_max_context, use_expandable_segments

    if cfg.num_processes > 1:
        raise PipelineInputError("bench --max-context measures one GPU: drop --num-processes")
    try:
        lengths = tuple(int(x) for x in args.context_lengths.split(",")) if args.context_lengths else DEFAULT_LENGTHS
    except ValueError:
        raise PipelineInputError(
            f"bench --context-lengths {args.context_lengths!r}: give token counts separated by commas, e.g. "
            "131072,262144"
        ) from None
    if not lengths or min(lengths) < 16:
        raise PipelineInputError("bench --context-lengths: each length must be at least 16 tokens")
    use_expandable_segments()
    report = run_max_context(cfg, lengths)
    print(markdown(report), end="")
    print(f"written: {args.out_dir}/max-context.json, {args.out_dir}/max-context.md")
    return 0 if report["longest_document_tokens"] else 1
