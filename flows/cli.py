"""`qlora-flow`: the command line of the pipeline.

    qlora-flow run      [--config FILE] [--set section.key=value ...]   fine-tune (default config if none)
    qlora-flow validate [--config FILE] [--set ...]                     check config + data, load no weights
    qlora-flow promote NAME VERSION --reason TEXT                       move the `champion` alias by hand
    qlora-flow generate --model SOURCE --prompt TEXT | --prompts FILE    answer prompts (stream one; batch a file)
    qlora-flow chat     --model SOURCE                                  talk to the model in the terminal
    qlora-flow compare  --model SOURCE [--prompt TEXT | --prompts FILE]  base vs fine-tuned, side by side
    qlora-flow merge    --model SOURCE --output DIR [--dtype bf16]      a standalone merged model (checked first)
    qlora-flow run --resume RUN_DIR | --no-resume                       continue a given run folder / always a new one
    qlora-flow sweep --config FILE --space SPACE.yaml [--set ...]       trials of a search space, the best registered
    qlora-flow runs [--config FILE]                                     run folders: finished / unfinished / locked
    qlora-flow gc --keep N [--config FILE] [--dry-run]                  remove checkpoints of older finished runs
    qlora-flow serve                                                    serve prefect.yaml's deployments here
    qlora-flow emit-dataset-updated PATH [--config FILE]                trigger re-training on a data file
    qlora-flow bench [--model llama2-7b] [--device auto] [--steps 10]   training speed: recipe vs TRL vs this

SOURCE: an adapter folder (outputs/<run>/adapter), a merged model folder, or an MLflow model URI
(models:/NAME@champion, models:/NAME/3, runs:/RUN_ID/model).
Bad input exits with code 2 and one short message (add --debug for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback

# Only light imports here: commands that load no model (--help, promote, emit-dataset-updated) start fast, and each
# command imports what it uses.
from pipeline_config.schema import DEFAULT_CONFIG_PATH, ConfigError
from qlora.errors import PipelineInputError

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-flow", description="QLoRA fine-tuning as a Prefect flow, tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the fine-tuning flow"), ("validate", "check config and data, load no model")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="YAML config (default: %(default)s)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one config value; repeatable",
        )
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "run":
            resume = p.add_mutually_exclusive_group()
            resume.add_argument(
                "--resume", dest="resume_dir", metavar="RUN_DIR", help="continue this run folder (see `runs`)"
            )
            resume.add_argument("--no-resume", action="store_true", help="start in a new run folder")
    p = sub.add_parser("sweep", help="run the trials of a search space on a config; register the best")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="YAML config (default: %(default)s)")
    p.add_argument("--space", required=True, help="search space YAML (e.g. pipeline_config/sweeps/default-space.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting"
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume_dir", metavar="SWEEP_DIR", help="continue this sweep folder")
    resume.add_argument(
        "--no-resume", action="store_true", help="start a new sweep (default: continue an unfinished one)"
    )
    p.add_argument(
        "--trial-deployment",
        default=None,
        metavar="FLOW/DEPLOYMENT",
        help="run the trials as runs of this finetune deployment on workers (e.g. qlora-finetune/qlora-default; needs "
        "PREFECT_API_URL); default: as subflows in this process",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    for name, help_text in (
        ("runs", "list the run folders under training.output_dir: status and size"),
        ("gc", "remove checkpoints of finished runs (never of unfinished or locked ones)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="config whose output_dir to look in")
        p.add_argument("--output-dir", default=None, help="look here instead of the config's training.output_dir")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "gc":
            p.add_argument("--keep", type=int, required=True, help="keep the checkpoints of the N newest finished runs")
            p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    uri_help = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    p = sub.add_parser("promote", help="move the champion alias of a registered model to VERSION by hand")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason", required=True, help="why; kept as a tag on the version")
    p.add_argument("--tracking-uri", default=None, help=uri_help)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    model_help = "adapter folder, merged model folder, or MLflow model URI (models:/NAME@champion, runs:/ID/model)"
    for name, help_text in (
        ("generate", "answer prompts: one streams to the terminal, a JSONL file is batched into a JSONL file"),
        ("chat", "a multi-turn conversation in the terminal (/reset, /exit)"),
        ("compare", "the same prompts through base and fine-tuned, side by side"),
        ("merge", "merge the adapter into its de-quantized base: a standalone model folder"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help=model_help)
        p.add_argument("--tracking-uri", default=None, help=uri_help)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        if name == "merge":
            p.add_argument("--output", required=True, help="new folder for the merged model")
            p.add_argument(
                "--dtype",
                choices=["auto", "bf16", "fp16", "fp32"],
                default="auto",
                help="merged weights' dtype (default: auto, the base model's own dtype)",
            )
            p.add_argument("--max-loss-change-pct", type=float, default=1.0, help="allowed eval-loss change, %%")
            p.add_argument("--min-agreement", type=float, default=0.9, help="greedy answers that must agree (0-1)")
            continue
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None, help="sampling seed")
        if name == "chat":
            p.add_argument("--system", default=None, help="a system prompt for the conversation")
            continue
        p.add_argument("--prompt", action="append", default=None, help="a prompt; repeatable")
        p.add_argument("--prompts", default=None, help="a JSONL file of {'prompt': ...} or {'messages': [...]}")
        p.add_argument("--batch-size", type=int, default=8)
        if name == "generate":
            p.add_argument("--output", default=None, help="JSONL answers for --prompts (default: FILE.out.jsonl)")
        else:
            p.add_argument(
                "--out-dir", default="compare-results", help="new (or empty) folder for compare.jsonl and compare.md"
            )
            p.add_argument("--mlflow-run", default=None, help="also log the report to this MLflow run")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the output this command wrote there earlier (never anything else)",
        )
    p = sub.add_parser("serve", help="serve the prefect.yaml deployments from this process (no worker needed)")
    p.add_argument("--include-gpu", action="store_true", help="also serve the GPU (Llama-2) deployment")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p = sub.add_parser("emit-dataset-updated", help="emit a dataset.updated event for a data file")
    p.add_argument("path")
    p.add_argument("--config", default="pipeline_config/default.yaml", help="config the triggered run uses")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_bench_parser(sub)
    return parser


def _add_bench_parser(sub) -> None:
    from bench.settings import ARCHITECTURES, DEFAULT_VARIANTS, VARIANTS, BenchConfig

    d = BenchConfig()
    p = sub.add_parser("bench", help="training speed of the original recipe, TRL's best settings and this project")
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
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def bench_command(args) -> int:
    from bench.run import run_bench
    from bench.settings import GEOMETRY, BenchConfig

    geometry = {**{k: getattr(BenchConfig(), k) for k in GEOMETRY["tiny"]}, **GEOMETRY.get(args.model, {})}
    given = {
        "seq_len": args.seq_len,
        "tokens_per_step": args.tokens_per_step,
        "project_micro_batch_tokens": args.micro_batch_tokens,
        "warmup_steps": args.warmup_steps,
    }
    geometry.update({k: v for k, v in given.items() if v is not None})
    if args.steps < 1 or geometry["warmup_steps"] < 1:
        raise PipelineInputError("bench: --steps and --warmup-steps must be at least 1")
    if args.num_processes < 1 or (args.num_layers is not None and args.num_layers < 1):
        raise PipelineInputError("bench: --num-processes and --num-layers must be at least 1")
    if args.max_context:
        return max_context_command(args, geometry)
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        from bench.run import launch_distributed_bench

        return launch_distributed_bench(args.num_processes, sys.argv[1:])
    report = run_bench(_bench_config(args, geometry))
    if not report:  # a distributed bench's other ranks: rank 0 reports
        return 0
    from bench.run import markdown_table

    print(markdown_table(report), end="")
    print(f"written: {args.out_dir}/bench.json, {args.out_dir}/bench.md")
    return 0 if not any(v["error"] for v in report["variants"]) else 1


def _bench_config(args, geometry: dict):
    """One bench invocation's settings from its command line (both the variants and --max-context read them)."""
    from bench.settings import BenchConfig

    return BenchConfig(
        model=args.model,
        device=args.device,
        steps=args.steps,
        check_packing=args.check_packing,
        **geometry,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        data=args.data,
        tokenizer_dir=args.tokenizer_dir,
        learning_rate=args.learning_rate,
        project_overrides=tuple(args.project_set),
        profile_steps=args.profile_steps,
        model_dir=args.model_dir,
        out_dir=args.out_dir,
        num_layers=args.num_layers,
        num_processes=args.num_processes,
        strategy=args.strategy,
        unsloth_site=args.unsloth_site,
        unsloth_python=args.unsloth_python,
    )


def max_context_command(args, geometry: dict) -> int:
    from bench.long_context import DEFAULT_LENGTHS, markdown, run_max_context, use_expandable_segments

    if args.num_processes > 1:
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
    report = run_max_context(_bench_config(args, geometry), lengths)
    print(markdown(report), end="")
    print(f"written: {args.out_dir}/max-context.json, {args.out_dir}/max-context.md")
    return 0 if report["longest_document_tokens"] else 1


def _tracking_uri(explicit: str | None) -> str:
    from pipeline_config.schema import TrackingConfig
    from qlora.services import resolve_tracking_uri

    return resolve_tracking_uri(TrackingConfig(tracking_uri=explicit))


def promote_command(name: str, version: str, reason: str, tracking_uri: str | None) -> int:
    from qlora.registry import promote
    from qlora.services import tracking_store_problem

    uri = _tracking_uri(tracking_uri)
    if problem := tracking_store_problem(uri):  # MLflow's client would retry for minutes
        raise PipelineInputError(problem)
    promote(name, version, reason, uri)
    print(f"{name} v{version} is now champion ({reason})")
    return 0


def _sampling(args):
    from qlora.inference import SamplingSettings

    return SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def _prompts(args) -> tuple[list | None, list[dict] | None]:
    """(prompts, the file's rows) from --prompt / --prompts; (None, None) when neither is given."""
    from pathlib import Path

    from qlora.inference import read_prompts_file

    if args.prompt and args.prompts:
        raise PipelineInputError("give --prompt or --prompts, not both")
    if args.batch_size < 1:
        raise PipelineInputError("--batch-size must be at least 1")
    if args.prompts:
        rows = read_prompts_file(Path(args.prompts))
        return [r.get("prompt", r.get("messages")) for r in rows], rows
    return args.prompt, None


def _load(args):
    from qlora.inference import load_for_inference

    return load_for_inference(args.model, _tracking_uri(args.tracking_uri))


def generate_command(args) -> int:
    """One prompt streams its tokens; several are batched; a file's answers go to a JSONL file (progress bar)."""
    import json
    from pathlib import Path

    from qlora.files import check_output_target, write_text_atomic
    from qlora.inference import as_prompt, generate_texts, is_answers_file

    settings = _sampling(args)
    prompts, rows = _prompts(args)
    if not prompts:
        raise PipelineInputError("generate needs --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    output = Path(args.output or Path(args.prompts).with_suffix(".out.jsonl")) if rows is not None else None
    if output is not None:  # before the model loads
        check_output_target(output, "--output", False, args.overwrite, is_answers_file)
    loaded = _load(args)
    asked = [as_prompt(p, loaded.has_chat_template) for p in prompts]
    if rows is None and len(asked) == 1:
        from qlora.chat import terminal_streamer

        generate_texts(
            loaded.model, loaded.tokenizer, asked, settings, streamer=terminal_streamer(loaded.tokenizer, sys.stdout)
        )
        print()
        return 0
    if rows is None:
        answers = generate_texts(loaded.model, loaded.tokenizer, asked, settings, args.batch_size)
        for prompt, answer in zip(prompts, answers, strict=True):
            print(f"> {prompt}\n{answer}")
        return 0
    from tqdm.auto import tqdm

    with tqdm(total=len(asked), desc="generating", unit="prompt", file=sys.stderr) as bar:
        answers = generate_texts(loaded.model, loaded.tokenizer, asked, settings, args.batch_size, on_batch=bar.update)
    write_text_atomic(output, "".join(json.dumps(r | {"output": a}) + "\n" for r, a in zip(rows, answers, strict=True)))
    print(f"{len(answers)} answers written to {output}")
    return 0


def chat_command(args) -> int:
    from qlora.chat import chat_session

    chat_session(_load(args), _sampling(args), system_prompt=args.system)
    return 0


def compare_command(args) -> int:
    import shutil
    from pathlib import Path

    from qlora.compare import check_report_folder, compare, format_table, write_report

    settings = _sampling(args)
    prompts, _ = _prompts(args)
    check_report_folder(Path(args.out_dir), args.overwrite)  # before the model loads
    loaded = _load(args)
    rows = compare(loaded, prompts, settings, args.batch_size)
    print(format_table(rows, width=shutil.get_terminal_size((120, 20)).columns))
    out = write_report(
        rows,
        Path(args.out_dir),
        args.model,
        settings,
        args.mlflow_run,
        _tracking_uri(args.tracking_uri),
        args.overwrite,
    )
    print(
        f"written: {out}/compare.jsonl, {out}/compare.md"
        + (f"; logged to MLflow run {args.mlflow_run}" if args.mlflow_run else "")
    )
    return 0


def merge_command(args) -> int:
    from pathlib import Path

    from qlora.files import check_output_target
    from qlora.merge import MergeRefused, merge_adapter

    if not 0 <= args.min_agreement <= 1 or args.max_loss_change_pct < 0:
        raise PipelineInputError("--min-agreement must be in [0, 1] and --max-loss-change-pct at least 0")
    check_output_target(Path(args.output), "--output", is_folder=True)  # before the model loads
    if Path(args.output).exists():
        raise PipelineInputError(f"--output {args.output} exists: choose a new folder (nothing is overwritten)")
    loaded = _load(args)
    try:
        result = merge_adapter(loaded, Path(args.output), args.dtype, args.max_loss_change_pct, args.min_agreement)
    except MergeRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print(
        f"merged ({result.dtype}) into {result.path} in {result.seconds:.0f} s, peak {result.peak_memory_mib:,.0f} MiB"
    )
    print(f"check: {result.check.describe()}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(result.path)!r})")
    return 0


def validate_command(config: str, overrides: list[str]) -> int:
    from qlora.preflight import preflight_from_config

    cfg, source, data, device, report = preflight_from_config(config, overrides)  # no weights, no GGUF conversion
    print(f"config ok: {config}")
    print(f"model: {source.description}; device: {device}")
    print(f"data: {data.source} format={data.kind} train={len(data.train)} eval={len(data.eval)} digest={data.digest}")
    print(report.render())
    return 0


class _OneLineInputErrors(logging.Filter):
    """Bad input is reported as one line: Prefect's log records of a failed step lose the traceback when the
    exception is an input error (`--debug` keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from qlora.errors import RunEnvironmentError
        from qlora.stop import RunInterrupted

        one_line = ConfigError | PipelineInputError | RunEnvironmentError | RunInterrupted
        if record.exc_info and isinstance(record.exc_info[1], one_line):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_input_error_tracebacks() -> None:
    import prefect.logging  # noqa: F401  (Prefect sets up its handlers on import)

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _OneLineInputErrors) for f in handler.filters):  # once per process
                handler.addFilter(_OneLineInputErrors())


def _services_ready(cfg) -> None:
    """The MLflow store and a configured Prefect API answer, found in seconds before anything starts (their clients
    would retry for minutes). Raises PipelineInputError."""
    from prefect.settings import PREFECT_API_URL

    from qlora.services import prefect_api_problem, resolve_tracking_uri, tracking_store_problem

    problems = [tracking_store_problem(resolve_tracking_uri(cfg.tracking))]
    if api_url := PREFECT_API_URL.value():
        problems.append(prefect_api_problem(api_url))
    if found := [p for p in problems if p]:
        raise PipelineInputError("; ".join(found))


@contextlib.contextmanager
def _orchestrated(cfg, debug: bool):
    """What `run` and `sweep` do around their flow (once `_services_ready`): graceful stop on SIGTERM / SIGINT
    (qlora/stop.py) from here to the end, the temporary Prefect server started so that it dies with this process (tasks/
    prefect_server.py). A stop ends the command with one line and exit code 128 + the signal's number."""
    from qlora.stop import graceful_stop

    if not debug:
        _quiet_input_error_tracebacks()
    with graceful_stop(cfg.training.stop_grace_s):
        from tasks.prefect_server import start_temporary_server

        start_temporary_server()
        yield


def _stopped(exc) -> int:
    print(f"stopped: {exc}", file=sys.stderr)
    if getattr(exc, "checkpoint", None):
        print(f"checkpoint: {exc.checkpoint}", file=sys.stderr)
    return exc.exit_code


def run_command(
    config: str, overrides: list[str], resume_dir: str | None = None, no_resume: bool = False, debug: bool = False
) -> int:
    from pipeline_config.schema import load_pipeline_config
    from qlora.stop import RunInterrupted

    cfg = load_pipeline_config(config, overrides)  # a bad config fails here, before Prefect starts
    _services_ready(cfg)  # in seconds, before the heavy imports
    from flows.finetune import finetune
    from qlora.services import resolve_tracking_uri

    started = time.perf_counter()
    resume = "never" if no_resume else None
    try:
        with _orchestrated(cfg, debug):
            # The flow gets the validated config itself; its preflight step checks data and tokenizer before weights.
            summary = finetune(config_path=config, config=cfg, resume=resume, resume_dir=resume_dir)
    except RunInterrupted as exc:
        return _stopped(exc)
    print(format_summary(summary, resolve_tracking_uri(cfg.tracking), time.perf_counter() - started))
    return 0


def sweep_command(args) -> int:
    from pipeline_config.schema import load_pipeline_config
    from pipeline_config.sweep import load_sweep_space
    from qlora.stop import RunInterrupted

    cfg = load_pipeline_config(args.config, args.overrides)  # a bad config or space fails here, before Prefect starts
    space = load_sweep_space(args.space, cfg)
    _services_ready(cfg)
    from flows.sweep import sweep
    from qlora.services import resolve_tracking_uri
    from tasks.sweep import SweepFailed

    started = time.perf_counter()
    try:
        with _orchestrated(cfg, args.debug):
            summary = sweep(
                config_path=args.config,
                space_path=args.space,
                resume="never" if args.no_resume else "auto",
                resume_dir=args.resume_dir,
                trial_deployment=args.trial_deployment,
                config=cfg,
            )
    except RunInterrupted as exc:
        return _stopped(exc)
    except SweepFailed as exc:
        print(f"sweep failed: {exc}", file=sys.stderr)
        return 1
    print(format_sweep_summary(summary, space, resolve_tracking_uri(cfg.tracking), time.perf_counter() - started))
    return 0


def format_sweep_summary(summary: dict, space, tracking_uri: str, wall_s: float) -> str:
    from qlora.sweep_report import results_markdown

    lines = ["", "=== QLoRA sweep summary ===", results_markdown(summary["trials"], space, bold=False)]
    lines.append(f"sweep folder: {summary['sweep_dir']} ({summary['sweep_dir_reason']})")
    lines.append(
        f"MLflow parent run: {summary['mlflow_run_id']} (experiment {summary['mlflow_experiment_id']}) in "
        f"{tracking_uri}; each trial is a child run"
    )
    if summary.get("registry"):
        reg = summary["registry"]
        role = "champion" if reg["became_champion"] else "challenger"
        lines.append(
            f"registered: {summary['registered_model']} v{reg['version']} (trial {summary['best']['trial']}) -> "
            f"{role} ({reg['reason']})"
        )
    lines.append(f"sweep wall time: {wall_s:.0f} s")
    return "\n".join(lines)


def format_summary(summary: dict, tracking_uri: str, wall_s: float) -> str:
    base, tuned = summary["base"], summary["finetuned"]
    lines = ["", "=== QLoRA fine-tuning summary ==="]
    lines.append(f"{'metric':<16}{'base':>12}{'fine-tuned':>12}")
    for key in ("exact_match", "eval_loss", "perplexity"):
        if key in base:
            lines.append(f"{key:<16}{base[key]:>12.3f}{tuned[key]:>12.3f}")
    t = summary["train"]
    lines.append(
        f"training: {t['train_steps']:.0f} steps, {t['train_tokens_per_s']:.0f} tokens/s, "
        f"peak memory {t['train_peak_memory_mib']:.0f} MiB on {summary['device']}"
    )
    lines.append(f"run folder: {summary['run_dir']} ({summary['run_dir_reason']})")
    lines.append(f"adapter: {summary['adapter_dir']}")
    lines.append(
        f"MLflow run: {summary['mlflow_run_id']} (experiment {summary['mlflow_experiment_id']}) in {tracking_uri}"
    )
    lines.append(f"  browse: mlflow ui --backend-store-uri {tracking_uri}")
    if summary.get("registry"):
        reg = summary["registry"]
        role = "champion" if reg["became_champion"] else "challenger"
        lines.append(f"registered: {summary['registered_model']} v{reg['version']} -> {role} ({reg['reason']})")
        lines.append(
            f"  ask it: qlora-flow generate --model models:/{summary['registered_model']}@champion --prompt ..."
        )
    lines.append(f"flow wall time: {wall_s:.0f} s")
    return "\n".join(lines)


def _runs_root(config: str, output_dir: str | None) -> str:
    from pathlib import Path

    if output_dir is None:
        from pipeline_config.schema import load_pipeline_config

        output_dir = load_pipeline_config(config).training.output_dir
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise PipelineInputError(f"--output-dir {output_dir} is a file: give the folder that holds the run folders")
    return output_dir


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def runs_command(config: str, output_dir: str | None) -> int:
    from qlora.run_folder import list_run_folders

    root = _runs_root(config, output_dir)
    folders = list_run_folders(root)
    if not folders:
        print(f"no run folders in {root}")
        return 0
    print(f"{'run folder':<48}{'status':<12}{'size':>11}{'ckpts':>7}  started")
    for f in folders:
        holder = f"  held by {f.holder}" if f.holder else ""
        print(f"{f.path.name:<48}{f.status:<12}{_size(f.size_bytes):>11}{f.checkpoints:>7}  {f.started_at}{holder}")
    return 0


def gc_command(config: str, output_dir: str | None, keep: int, dry_run: bool) -> int:
    from qlora.run_folder import remove_old_checkpoints

    result = remove_old_checkpoints(_runs_root(config, output_dir), keep, dry_run)
    verb = "would remove" if dry_run else "removed"
    for path in result.removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(result.removed)} checkpoint folder(s), {_size(result.freed_bytes)}; kept {len(result.kept)}")
    return 0


def _is_input_error(exc: Exception) -> bool:
    """Bad input: a config or input error, or an MLflow refusal (unknown model version...). MLflow is only looked
    at if the command imported it."""
    if isinstance(exc, ConfigError | PipelineInputError):
        return True
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        return isinstance(exc, MlflowException)
    return False


def main(argv: list[str] | None = None) -> int:
    # The temporary Prefect server `run` starts needs no usage analytics (they also log a spurious SQLite error).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return validate_command(args.config, args.overrides)
        if args.command == "promote":
            return promote_command(args.name, args.version, args.reason, args.tracking_uri)
        if args.command in ("generate", "chat", "compare", "merge"):
            command = {"generate": generate_command, "chat": chat_command, "compare": compare_command}
            return command.get(args.command, merge_command)(args)
        if args.command == "serve":
            from flows.deployments import serve_deployments

            serve_deployments(include_gpu=args.include_gpu)
            return 0
        if args.command == "bench":
            return bench_command(args)
        if args.command == "emit-dataset-updated":
            from flows.deployments import emit_dataset_updated

            print(f"emitted dataset.updated {emit_dataset_updated(args.path, args.config)}")
            return 0
        if args.command == "sweep":
            return sweep_command(args)
        if args.command == "runs":
            return runs_command(args.config, args.output_dir)
        if args.command == "gc":
            return gc_command(args.config, args.output_dir, args.keep, args.dry_run)
        return run_command(args.config, args.overrides, args.resume_dir, args.no_resume, args.debug)
    except Exception as exc:
        from qlora.errors import RunEnvironmentError

        if not (_is_input_error(exc) or isinstance(exc, RunEnvironmentError)):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RunEnvironmentError) else EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
