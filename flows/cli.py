"""`qlora-flow`: the command line of the pipeline.

    qlora-flow run      [--config FILE] [--set section.key=value ...]   fine-tune (default config if none)
    qlora-flow validate [--config FILE] [--set ...]                     check config + data, load no weights

Bad input exits with code 2 and one short message (add --debug for the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from pipeline_config.schema import DEFAULT_CONFIG_PATH, ConfigError
from tasks.errors import PipelineInputError

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
    return parser


def validate_command(config: str, overrides: list[str]) -> int:
    from tasks.model_source import check_model_source
    from tasks.preflight import preflight_from_config

    cfg, data, device, report = preflight_from_config(config, overrides)
    print(f"config ok: {config}")
    print(f"model: {check_model_source(cfg.model)}; device: {device}")
    print(f"data: {data.source} format={data.kind} train={len(data.train)} eval={len(data.eval)} digest={data.digest}")
    print(report.render())
    return 0


def run_command(config: str, overrides: list[str]) -> int:
    from tasks.preflight import preflight_from_config

    cfg, _, _, report = preflight_from_config(config, overrides)  # fail fast, before Prefect or any weights start
    print(report.render())
    from flows.finetune import finetune
    from tasks.tracking import resolve_tracking_uri

    started = time.perf_counter()
    summary = finetune(config_path=config, overrides=overrides)
    print(format_summary(summary, resolve_tracking_uri(cfg.tracking), time.perf_counter() - started))
    return 0


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
    lines.append(f"adapter: {summary['adapter_dir']}")
    lines.append(
        f"MLflow run: {summary['mlflow_run_id']} (experiment {summary['mlflow_experiment_id']}) in {tracking_uri}"
    )
    lines.append(f"  browse: mlflow ui --backend-store-uri {tracking_uri}")
    lines.append(f"flow wall time: {wall_s:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return validate_command(args.config, args.overrides)
        return run_command(args.config, args.overrides)
    except (ConfigError, PipelineInputError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
