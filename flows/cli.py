"""`qlora-flow`: the command line of the pipeline.

    qlora-flow run      [--config FILE] [--set section.key=value ...]   fine-tune (default config if none)
    qlora-flow run --resume RUN_DIR | --no-resume                       continue a given run folder / always a new one
    qlora-flow validate [--config FILE] [--set ...]                     check config + data, load no weights
    qlora-flow sweep    [--config FILE] --space SPACE.yaml [--set ...]  trials of a search space, the best registered
    qlora-flow evaluate --model SOURCE [--config FILE]                  score a model on the config's harness suites
    qlora-flow merge    --model SOURCE [--output DIR] [--dtype fp32]    merge, check, save and register a merged model
    qlora-flow promote NAME VERSION --reason TEXT                       move the `champion` alias by hand
    qlora-flow generate --model SOURCE --prompt TEXT | --prompts FILE    answer prompts (stream one; batch a file)
    qlora-flow chat     --model SOURCE                                  talk to the model in the terminal
    qlora-flow compare  --model SOURCE [--prompt TEXT | --prompts FILE]  base vs fine-tuned, side by side
    qlora-flow runs [--config FILE]                                     run folders: finished / unfinished / locked
    qlora-flow gc --keep N [--config FILE] [--dry-run]                  remove checkpoints of older finished runs
    qlora-flow serve                                                    serve prefect.yaml's deployments here
    qlora-flow emit-dataset-updated PATH [--config FILE]                trigger re-training on a data file
    qlora-flow bench [--model llama2-7b] [--device auto] [--steps 10]   training speed: recipe vs TRL vs this

`run`, `validate`, `sweep`, `evaluate` and `merge` take their flow's parameters (flows/flow_options.py): the flow's
signature and docstring are the one description of them, for this command line and for a deployment's parameters.
SOURCE: an adapter folder (outputs/<run>/adapter), a merged model folder, or an MLflow model URI
(models:/NAME@champion, models:/NAME/3, runs:/RUN_ID/model).
Bad input exits with code 2 and one short message (add --debug for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

# Only light imports here: commands that load no model (--help, promote, emit-dataset-updated) start fast, and each
# command imports what it uses.
from flows.flow_options import Switch, add_flow_options, flow_arguments, flow_parameter_schema
from pipeline_config.loading import DEFAULT_CONFIG_PATH, ConfigError
from qlora.errors import PipelineInputError

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class FlowCommand:
    """A command whose options are a flow's parameters (`flow`: 'module:function'); `flags` names an option only
    where it is not `--<parameter-name>`."""

    flow: str
    help: str
    flags: dict = field(default_factory=dict)
    only: tuple[str, ...] | None = None


_CONFIG_FLAGS = {"config_path": "--config", "overrides": "--set"}
_RESUME_FLAGS = {"resume_dir": "--resume", "resume": Switch("--no-resume", "never")}
_METAVARS = {"config_path": "FILE", "overrides": "SECTION.KEY=VALUE", "resume_dir": "DIR", "space_path": "SPACE.yaml"}
FLOW_COMMANDS = {
    "run": FlowCommand("flows.finetune:finetune", "run the fine-tuning flow", _CONFIG_FLAGS | _RESUME_FLAGS),
    "validate": FlowCommand(
        "flows.finetune:finetune",
        "check config and data, load no model",
        _CONFIG_FLAGS,
        only=("config_path", "overrides", "data_source", "adapter"),
    ),
    "sweep": FlowCommand(
        "flows.sweep:sweep",
        "run the trials of a search space on a config; register the best",
        _CONFIG_FLAGS | _RESUME_FLAGS | {"space_path": "--space"},
    ),
    "evaluate": FlowCommand(
        "flows.evaluate:evaluate", "score a model on the config's harness suites; record the scores", _CONFIG_FLAGS
    ),
    "merge": FlowCommand(
        "flows.merge:merge",
        "merge an adapter into its de-quantized base; check, save, register",
        {"register_model": "--register"},
    ),
}


def _flow(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # what every command takes
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = argparse.ArgumentParser(
        prog="qlora-flow", description="QLoRA fine-tuning as a Prefect flow, tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    handlers = {
        "run": run_command,
        "validate": validate_command,
        "sweep": sweep_command,
        "evaluate": evaluate_command,
        "merge": merge_command,
    }
    for name, command in FLOW_COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=command.help, description=command.help)
        p.set_defaults(handler=handlers[name])
        if name == chosen:  # only the command that runs reads its flow's parameters
            add_flow_options(p, flow_parameter_schema(command.flow), command.flags, command.only, _METAVARS)

    folders = argparse.ArgumentParser(add_help=False)
    folders.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="config whose output_dir to look in")
    folders.add_argument("--output-dir", default=None, help="look here instead of the config's training.output_dir")
    p = sub.add_parser("runs", parents=[common, folders], help="list the run folders under training.output_dir")
    p.set_defaults(handler=runs_command)
    p = sub.add_parser(
        "gc", parents=[common, folders], help="remove checkpoints of finished runs (never of unfinished or locked ones)"
    )
    p.add_argument("--keep", type=int, required=True, help="keep the checkpoints of the N newest finished runs")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(handler=gc_command)

    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p = sub.add_parser(
        "promote", parents=[common, tracking], help="move the champion alias of a registered model by hand"
    )
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason", required=True, help="why; kept as a tag on the version")
    p.set_defaults(handler=promote_command)
    _add_inference_commands(sub, [common, tracking])

    p = sub.add_parser("serve", parents=[common], help="serve the prefect.yaml deployments from this process")
    p.add_argument("--include-gpu", action="store_true", help="also serve the GPU (Llama-2) deployment")
    p.set_defaults(handler=serve_command)
    p = sub.add_parser("emit-dataset-updated", parents=[common], help="emit a dataset.updated event for a data file")
    p.add_argument("path")
    p.add_argument("--config", default="pipeline_config/default.yaml", help="config the triggered run uses")
    p.set_defaults(handler=emit_dataset_updated_command)

    from bench.cli import add_bench_command

    add_bench_command(sub, [common])
    return parser


def _add_inference_commands(sub, parents: list[argparse.ArgumentParser]) -> None:
    """generate, chat and compare: a model SOURCE and sampling settings each."""
    model = argparse.ArgumentParser(add_help=False, parents=parents)
    model.add_argument(
        "--model",
        required=True,
        help="adapter folder, merged model folder, or MLflow model URI (models:/NAME@champion, runs:/ID/model)",
    )
    model.add_argument("--max-new-tokens", type=int, default=256)
    model.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    model.add_argument("--top-p", type=float, default=1.0)
    model.add_argument("--seed", type=int, default=None, help="sampling seed")
    prompts = argparse.ArgumentParser(add_help=False)
    prompts.add_argument("--prompt", action="append", default=None, help="a prompt; repeatable")
    prompts.add_argument("--prompts", default=None, help="a JSONL file of {'prompt': ...} or {'messages': [...]}")
    prompts.add_argument("--batch-size", type=int, default=8)
    prompts.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output this command wrote there earlier (never anything else)",
    )
    p = sub.add_parser(
        "generate",
        parents=[model, prompts],
        help="answer prompts: one streams to the terminal, a JSONL file is batched into a JSONL file",
    )
    p.add_argument("--output", default=None, help="JSONL answers for --prompts (default: FILE.out.jsonl)")
    p.set_defaults(handler=generate_command)
    p = sub.add_parser("chat", parents=[model], help="a multi-turn conversation in the terminal (/reset, /exit)")
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    p.set_defaults(handler=chat_command)
    p = sub.add_parser("compare", parents=[model, prompts], help="the same prompts through base and fine-tuned")
    p.add_argument(
        "--out-dir", default="compare-results", help="new (or empty) folder for compare.jsonl and compare.md"
    )
    p.add_argument("--mlflow-run", default=None, help="also log the report to this MLflow run")
    p.set_defaults(handler=compare_command)


# --- the flow commands ---------------------------------------------------------------------------------------------


class _OneLineInputErrors(logging.Filter):
    """Bad input, a refusal or a stop is reported as one line: Prefect's log records of a failed step lose the
    traceback when the exception is one of those (`--debug` keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from qlora.errors import Refused, RunEnvironmentError
        from qlora.stop import RunInterrupted

        one_line = ConfigError | PipelineInputError | RunEnvironmentError | RunInterrupted | Refused
        if record.exc_info and isinstance(record.exc_info[1], one_line):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_input_error_tracebacks() -> None:
    import prefect.logging  # noqa: F401  (Prefect sets up its handlers on import)

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _OneLineInputErrors) for f in handler.filters):  # once per process
                handler.addFilter(_OneLineInputErrors())


def _services_ready(tracking_uri: str) -> None:
    """The MLflow store and a configured Prefect API answer, found in seconds before anything starts (their clients
    would retry for minutes). Raises PipelineInputError."""
    from prefect.settings import PREFECT_API_URL

    from qlora.services import prefect_api_problem, tracking_store_problem

    problems = [tracking_store_problem(tracking_uri)]
    if api_url := PREFECT_API_URL.value():
        problems.append(prefect_api_problem(api_url))
    if found := [p for p in problems if p]:
        raise PipelineInputError("; ".join(found))


@contextlib.contextmanager
def _orchestrated(debug: bool, stop_grace_s: float | None = None):
    """What a flow command does around its flow (once `_services_ready`): graceful stop on SIGTERM / SIGINT
    (qlora/stop.py) from here to the end when `stop_grace_s` is given, the temporary Prefect server started so that
    it dies with this process (tasks/prefect_server.py). A stop ends the command with one line and exit code 128 +
    the signal's number."""
    from qlora.stop import graceful_stop

    if not debug:
        _quiet_input_error_tracebacks()
    with graceful_stop(stop_grace_s) if stop_grace_s is not None else contextlib.nullcontext():
        from tasks.prefect_server import start_temporary_server

        start_temporary_server()
        yield


def _stopped(exc) -> int:
    print(f"stopped: {exc}", file=sys.stderr)
    if getattr(exc, "checkpoint", None):
        print(f"checkpoint: {exc.checkpoint}", file=sys.stderr)
    return exc.exit_code


def _run_flow(args, tracking_uri: str | None, stop_grace_s: float | None = None, **given):
    """The command's flow, run in this process with its options (and `given`): the services it needs answer first
    (`tracking_uri`; in seconds, before the heavy imports), a stop ends it with one line. Returns (the flow's
    summary, exit code 0, wall seconds), or (None, the stop's exit code, 0)."""
    from qlora.stop import RunInterrupted

    if tracking_uri is not None:
        _services_ready(tracking_uri)
    flow = _flow(FLOW_COMMANDS[args.command].flow)
    started = time.perf_counter()
    try:
        with _orchestrated(args.debug, stop_grace_s):
            summary = flow(**flow_arguments(args), **given)
    except RunInterrupted as exc:
        return None, _stopped(exc), 0.0
    return summary, 0, time.perf_counter() - started


def run_command(args) -> int:
    from qlora.report import run_summary_text
    from qlora.run_config import settle_run_config
    from qlora.services import resolve_tracking_uri

    params = flow_arguments(args)
    keys = ("config_path", "overrides", "data_source", "resume", "resume_dir", "adapter")
    settled = {k: params.get(k) for k in keys}
    cfg = settle_run_config(None, **settled)  # a bad config fails here, before Prefect starts
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    # The flow gets the validated config itself; its preflight step checks data and tokenizer before weights.
    summary, code, wall_s = _run_flow(args, tracking_uri, cfg.training.stop_grace_s, config=cfg)
    if summary is not None:
        print(run_summary_text(summary, tracking_uri, wall_s))
    return code


def validate_command(args) -> int:
    from qlora.preflight import preflight_from_config
    from qlora.run_config import settle_run_config

    params = flow_arguments(args)
    cfg = settle_run_config(
        None, params["config_path"], params.get("overrides"), params.get("data_source"), adapter=params.get("adapter")
    )
    cfg, source, data, device, report = preflight_from_config(cfg)  # no weights, no GGUF conversion
    if cfg.model.adapter:
        from qlora.stages import resolve_starting_adapter

        starting = resolve_starting_adapter(cfg)  # a registry version is downloaded (small): no base weights
        print(
            f"starting adapter: {cfg.model.adapter} -> {starting.path} ({', '.join(starting.lineage_tags().values())})"
        )
    print(f"config ok: {params['config_path']}")
    print(f"model: {source.description}; device: {device}")
    print(f"data: {data.source} format={data.kind} train={len(data.train)} eval={len(data.eval)} digest={data.digest}")
    print(report.render())
    return 0


def sweep_command(args) -> int:
    from pipeline_config.loading import load_pipeline_config
    from pipeline_config.sweep import load_sweep_space
    from qlora.services import resolve_tracking_uri
    from qlora.sweep_report import sweep_summary_text

    params = flow_arguments(args)
    cfg = load_pipeline_config(params["config_path"], params.get("overrides"))  # bad input fails before Prefect
    space = load_sweep_space(params["space_path"], cfg)
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    from tasks.sweep import SweepFailed

    try:
        summary, code, wall_s = _run_flow(args, tracking_uri, cfg.training.stop_grace_s, config=cfg)
    except SweepFailed as exc:
        print(f"sweep failed: {exc}", file=sys.stderr)
        return 1
    if summary is not None:
        print(sweep_summary_text(summary, space, tracking_uri, wall_s))
    return code


def evaluate_command(args) -> int:
    from pipeline_config.loading import load_pipeline_config
    from qlora.services import resolve_tracking_uri

    params = flow_arguments(args)
    cfg = load_pipeline_config(params["config_path"], params.get("overrides"))  # bad input fails before Prefect
    if not cfg.evaluation.suites:
        raise PipelineInputError(f"{params['config_path']}: evaluation.suites is empty: nothing to score the model on")
    if params.get("all_versions") and not params["model"].startswith("models:/"):
        from qlora.scoring import sources_to_score

        sources_to_score(params["model"], True)  # raises the input error before Prefect starts
    tracking_uri = params.get("tracking_uri") or resolve_tracking_uri(cfg.tracking)
    given = {} if params.get("tracking_uri") else {"tracking_uri": tracking_uri}  # the config's, unless given
    summary, code, wall_s = _run_flow(args, tracking_uri, **given)
    if summary is None:
        return code
    for scored in summary["scored"]:
        if len(summary["scored"]) > 1:
            print(f"-- {scored['model']}")
        for key, value in sorted(scored["metrics"].items()):
            print(f"{key:<60}{value:>14.4f}")
        where = f"; scores on {scored['version']}'s tags" if scored["version"] else ""
        print(f"MLflow run {scored['run_id']} in {tracking_uri}{where}")
    print(f"scored {len(summary['scored'])} model(s) in {wall_s:.0f} s")
    return 0


def merge_command(args) -> int:
    from qlora.merge import MergeRefused, merge_target

    params = flow_arguments(args)
    if params.get("output"):  # the flow checks it again; here it fails before Prefect starts
        merge_target(params["output"], "", params["max_loss_change_pct"], params["min_agreement"])
    uses_registry = params["register_model"] or params["model"].startswith(("models:", "runs:"))
    try:
        summary, code, _ = _run_flow(args, _tracking_uri(params.get("tracking_uri")) if uses_registry else None)
    except MergeRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    if summary is None:
        return code
    print(
        f"merged ({summary['dtype']}) into {summary['merged_dir']} in {summary['seconds']:.0f} s, "
        f"peak {summary['peak_memory_mib']:,.0f} MiB"
    )
    print(f"check: {summary['check']}")
    if summary.get("version"):
        print(f"registered: models:/{summary['name']}/{summary['version']}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({summary['merged_dir']!r})")
    return 0


# --- the other commands --------------------------------------------------------------------------------------------


def _tracking_uri(explicit: str | None) -> str:
    from pipeline_config.schema import TrackingConfig
    from qlora.services import resolve_tracking_uri

    return resolve_tracking_uri(TrackingConfig(tracking_uri=explicit))


def promote_command(args) -> int:
    from qlora.registry import promote
    from qlora.services import tracking_store_problem

    uri = _tracking_uri(args.tracking_uri)
    if problem := tracking_store_problem(uri):  # MLflow's client would retry for minutes
        raise PipelineInputError(problem)
    promote(args.name, args.version, args.reason, uri)
    print(f"{args.name} v{args.version} is now champion ({args.reason})")
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


def _runs_root(config: str, output_dir: str | None) -> str:
    from pathlib import Path

    if output_dir is None:
        from pipeline_config.loading import load_pipeline_config

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


def runs_command(args) -> int:
    from qlora.run_folder import list_run_folders

    root = _runs_root(args.config, args.output_dir)
    folders = list_run_folders(root)
    if not folders:
        print(f"no run folders in {root}")
        return 0
    print(f"{'run folder':<48}{'status':<12}{'size':>11}{'ckpts':>7}  started")
    for f in folders:
        holder = f"  held by {f.holder}" if f.holder else ""
        print(f"{f.path.name:<48}{f.status:<12}{_size(f.size_bytes):>11}{f.checkpoints:>7}  {f.started_at}{holder}")
    return 0


def gc_command(args) -> int:
    from qlora.run_folder import remove_old_checkpoints

    result = remove_old_checkpoints(_runs_root(args.config, args.output_dir), args.keep, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in result.removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(result.removed)} checkpoint folder(s), {_size(result.freed_bytes)}; kept {len(result.kept)}")
    return 0


def serve_command(args) -> int:
    from flows.deployments import serve_deployments

    serve_deployments(include_gpu=args.include_gpu)
    return 0


def emit_dataset_updated_command(args) -> int:
    from flows.deployments import emit_dataset_updated

    print(f"emitted dataset.updated {emit_dataset_updated(args.path, args.config)}")
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
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv).parse_args(argv)
    try:
        return args.handler(args)
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
