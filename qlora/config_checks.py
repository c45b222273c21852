"""Config checks that need the libraries themselves: names only transformers or MLflow can judge.

The schema (pipeline_config/schema.py) checks types, ranges and fields against each other without importing any of
them (so that `qlora-flow runs` or `--help` start fast). What is left would otherwise fail late, after the weights
load or after training: an optimizer or scheduler name transformers does not know, a registered-model name MLflow
refuses at registration, a tracking URI scheme MLflow has no store for. `validate` and the flow's preflight step call
`library_setting_problems`, before any weights load.
"""

from __future__ import annotations

import difflib

from pipeline_config.schema import PipelineConfig


def _unknown(field: str, value: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(known[:12]) + (f" (and {len(known) - 12} more)" if len(known) > 12 else "")
    return f"{field} {value!r} is not {what}: {hint}choose one of {shown}"


def library_setting_problems(cfg: PipelineConfig) -> list[str]:
    """Every problem with names the libraries decide on, one line each; [] when all is well."""
    from transformers import SchedulerType
    from transformers.training_args import OptimizerNames

    from qlora.integrations.mlflow_names import registered_model_name_problem, tracking_uri_problem
    from qlora.services import resolve_tracking_uri

    problems = []
    t = cfg.training
    optimizers = [o.value for o in OptimizerNames]
    if t.optim not in optimizers:
        problems.append(_unknown("training.optim", t.optim, optimizers, "an optimizer transformers knows"))
    schedulers = [s.value for s in SchedulerType]
    if t.lr_scheduler_type not in schedulers:
        problems.append(
            _unknown("training.lr_scheduler_type", t.lr_scheduler_type, schedulers, "a scheduler transformers knows")
        )
    if cfg.registry.enabled and cfg.registry.model_name is not None:
        if why := registered_model_name_problem(cfg.registry.model_name):
            problems.append(f"registry.model_name {cfg.registry.model_name!r}: {why}")
    uri = resolve_tracking_uri(cfg.tracking)
    if why := tracking_uri_problem(uri):
        origin = "tracking.tracking_uri" if cfg.tracking.tracking_uri else "$MLFLOW_TRACKING_URI"
        problems.append(f"{origin} {uri!r}: {why}")
    return problems
