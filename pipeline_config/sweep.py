"""The search space of a sweep (`qlora-flow sweep --config FILE --space SPACE.yaml`): which settings the trials vary,
how trials are picked, what decides the best one, and when a hopeless trial stops early.

    method: grid                                      # grid (every combination) | random | tpe
    n_trials: 6                                       # grid: optional, the number of combinations
    parameters:
      lora.r: [8, 16, 32]                             # a list: these values (grid: every combination)
      training.learning_rate: loguniform(1e-5, 1e-3)  # random / tpe: a distribution
    overrides:                                        # what every trial gets (like --set)
      training.max_steps: 20
    pruning: {pruner: median, eval_every_steps: 5}

`load_sweep_space` checks the file against the config it sweeps before anything runs: every parameter must name a
tunable setting, every listed value and both ends of every range must make a valid config (every grid combination
too), and the trial count must fit the method. Every problem is reported at once, with its line in the file.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from pipeline_config.loading import (
    ConfigError,
    did_you_mean,
    field_annotation,
    known_keys,
    load_pipeline_config,
    read_yaml_mapping,
    validation_problems,
)
from pipeline_config.schema import PipelineConfig, PruningConfig
from pipeline_config.section import Section

# Settings a sweep may vary; the rest (model, data, evaluation, tracking, registry, distributed) is the same for
# every trial, so that trials are compared on the same data and the same evaluation.
TUNABLE_SECTIONS = ("lora", "quantization", "training")
# Where and how a trial runs, not what it trains: the sweep sets these itself.
UNTUNABLE_KEYS = {
    "training.output_dir",
    "training.resume",
    "training.device",
    "training.gpu_concurrency_limit",
    "training.gpu_slots",
    "training.task_retries",
}
# Metrics every trial logs, and whether greater is better.
METRIC_GREATER_IS_BETTER = {
    "finetuned_eval_loss": False,
    "finetuned_perplexity": False,
    "finetuned_exact_match": True,
    "train_loss": False,
}
# Pruners compare the eval loss trials report while they train, so the sweep's metric must fall with it.
PRUNABLE_METRICS = ("finetuned_eval_loss", "finetuned_perplexity")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint")
DISTRIBUTION_HELP = "a list of values, uniform(low, high), loguniform(low, high), int(low, high) or logint(low, high)"
MAX_CHECKED_COMBINATIONS = 512  # grids up to this size have every combination validated up front

Scalar = bool | int | float | str


class SweepSpaceError(ConfigError):
    """The space file is invalid; `problems` lists every finding, each with its line."""

    def __init__(self, problems: list[str], source: str | None = None):
        super().__init__(problems, source)
        head = f"invalid sweep space in {source}" if source else "invalid sweep space"
        self.args = (head + ":\n" + "\n".join(f"  - {p}" for p in problems),)

    def __str__(self) -> str:
        return self.args[0]


class SweepSpaceConfig(Section):
    """What a space file holds (module docstring)."""

    method: Literal["grid", "random", "tpe"] = Field(
        default="grid",
        description="'grid': every combination of the listed values once, in the order listed (the first parameter "
        "varies slowest); 'random': `n_trials` independent "
        "draws (optuna RandomSampler); 'tpe': `n_trials` draws guided by the finished ones (optuna TPESampler).",
    )
    n_trials: int | None = Field(
        default=None, ge=1, description="Trials to run. Grid: optional (all combinations); random / tpe: required."
    )
    seed: int = Field(default=0, description="Seed of the sampler: the same file picks the same trials.")
    metric: str | None = Field(
        default=None,
        description="Metric that picks the best trial (and that the registry's champion rule compares): one of "
        f"{', '.join(METRIC_GREATER_IS_BETTER)}. Unset: the config's registry.metric / greater_is_better.",
    )
    parameters: dict[str, Any] = Field(
        description=f"Setting ('section.key') -> its values: {DISTRIBUTION_HELP}.", min_length=1
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Settings every trial gets ('section.key' -> value), like --set."
    )
    pruning: PruningConfig = Field(default_factory=PruningConfig, description="Early stopping of hopeless trials.")
    max_parallel_trials: int | None = Field(
        default=None,
        ge=1,
        description="Trials in flight at once when they run through a deployment. Unset: as many as the GPU "
        "concurrency limit has slots for (training.gpu_slots each). Trials in the sweep's own process take turns.",
    )


@dataclass(frozen=True)
class ParameterSpec:
    """One swept setting: a list of values, or a range."""

    key: str
    kind: Literal["choice", "uniform", "loguniform", "int", "logint"]
    choices: tuple[Scalar, ...] = ()
    low: float = 0.0
    high: float = 0.0

    def describe(self) -> str:
        if self.kind == "choice":
            return "[" + ", ".join(repr(c) if isinstance(c, str) else str(c) for c in self.choices) + "]"
        fmt = (lambda v: str(int(v))) if self.kind in ("int", "logint") else (lambda v: f"{v:g}")
        return f"{self.kind}({fmt(self.low)}, {fmt(self.high)})"

    def ends(self) -> tuple[Scalar, ...]:
        """The values whose configs are checked up front: every choice, or both ends of the range."""
        if self.kind == "choice":
            return self.choices
        if self.kind in ("int", "logint"):
            return (int(self.low), int(self.high))
        return (self.low, self.high)


@dataclass
class SweepSpace:
    """A validated space, resolved against its config."""

    source: str  # the file
    text: str  # its content, logged with the sweep
    config: SweepSpaceConfig
    parameters: dict[str, ParameterSpec]
    n_trials: int
    metric: str
    greater_is_better: bool
    base: PipelineConfig  # the config with the space's overrides: what every trial starts from
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)

    @property
    def grid_size(self) -> int | None:
        if any(p.kind != "choice" for p in self.parameters.values()):
            return None
        return math.prod(len(p.choices) for p in self.parameters.values())

    def flat(self) -> dict[str, Any]:
        """The space as {'sweep.key': value} (MLflow params of the sweep's parent run)."""
        c = self.config
        flat = {
            "sweep.method": c.method,
            "sweep.n_trials": self.n_trials,
            "sweep.seed": c.seed,
            "sweep.metric": self.metric,
            "sweep.greater_is_better": self.greater_is_better,
            "sweep.pruner": c.pruning.pruner,
        }
        if c.pruning.pruner != "none":
            unused = {"pruner"} | ({"percentile"} if c.pruning.pruner != "percentile" else set())
            flat |= {f"sweep.pruning.{k}": v for k, v in c.pruning.model_dump(exclude=unused).items()}
        flat |= {f"sweep.parameters.{k}": p.describe() for k, p in self.parameters.items()}
        return flat


_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$")


def _dotted(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _number(text: str) -> float | None:
    """A finite number written as Python or YAML would (1e-5, 0.001, 16); None otherwise."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_parameter(key: str, raw: Any) -> ParameterSpec:
    """A space entry as a ParameterSpec. Raises ValueError saying what is wrong and what to write instead."""
    if isinstance(raw, list):
        if not raw:
            raise ValueError("an empty list: give at least two values")
        bad = [c for c in raw if not isinstance(c, Scalar)]
        if bad:
            raise ValueError(f"value {bad[0]!r} is not a number, string or boolean (values of a sweep are scalars)")
        if len(set(map(repr, raw))) != len(raw):
            raise ValueError(f"{raw} lists a value twice")
        return ParameterSpec(key, "choice", tuple(raw))
    if not isinstance(raw, str):
        raise ValueError(f"{raw!r} is one value, not a search: put it under overrides:, or give {DISTRIBUTION_HELP}")
    match = _CALL.match(raw)
    if not match or match.group(1) not in DISTRIBUTIONS:
        raise ValueError(f"{raw!r} is not a distribution: write {DISTRIBUTION_HELP}")
    kind, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
    numbers = [_number(a) for a in args]
    if len(args) != 2 or None in numbers:
        raise ValueError(f"{raw!r}: {kind} takes two numbers, {kind}(low, high)")
    low, high = numbers
    if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
        raise ValueError(f"{raw!r}: {kind} takes two integers")
    if not low < high:
        raise ValueError(f"{raw!r}: low must be below high (a single value goes under overrides:)")
    if kind.startswith("log") and low <= 0:
        raise ValueError(f"{raw!r}: a log scale needs low > 0")
    return ParameterSpec(key, kind, low=low, high=high)


def _tunable_problem(key: str) -> str | None:
    annotation = field_annotation(key.split("."))
    if annotation is None or isinstance(annotation, type) and issubclass(annotation, BaseModel):  # or a section
        return f"unknown config setting{did_you_mean(key, known_keys(PipelineConfig))}"
    if key.split(".")[0] not in TUNABLE_SECTIONS or key in UNTUNABLE_KEYS:
        return (
            f"not a setting a sweep varies: trials differ only in {', '.join(s + '.*' for s in TUNABLE_SECTIONS)} "
            "(not where or how they run); set it in the config or under overrides:"
        )
    return None


def _config_problems(base: dict, values: dict[str, Any]) -> list[str]:
    try:
        load_pipeline_config(base, values)
    except ConfigError as exc:
        return exc.problems
    return []


def load_sweep_space(source: str | Path, cfg: PipelineConfig) -> SweepSpace:
    """Read and check a space file against the config `cfg` it sweeps. Raises SweepSpaceError (a ConfigError)
    listing every problem with its line."""
    name = str(source)
    file = read_yaml_mapping(
        name, "the top level must be a mapping (method:, n_trials:, parameters: ...)", SweepSpaceError
    )
    try:
        space_cfg = SweepSpaceConfig.model_validate(file.data)
    except ValidationError as exc:
        missing = "required (the settings the trials vary, e.g. lora.r: [8, 16])"
        raise SweepSpaceError(validation_problems(exc, SweepSpaceConfig, file, missing), name) from None

    problems: list[str] = []
    base_raw = cfg.model_dump(mode="json")
    # `training: {max_steps: 4}` is `training.max_steps: 4`: a nested override sets its keys, never a whole section
    overrides = _dotted(space_cfg.overrides)
    for key, value in overrides.items():
        at = file.at("overrides", key) or file.at("overrides", *key.split("."))
        if key in space_cfg.parameters:
            problems.append(f"{at}overrides.{key}: also under parameters: keep one")
        problems += [
            f"{at}overrides.{key}: {p.removeprefix(key + ': ')}" for p in _config_problems(base_raw, {key: value})
        ]
    if problems:
        raise SweepSpaceError(problems, name)
    base = load_pipeline_config(base_raw, overrides)
    base_raw = base.model_dump(mode="json")

    specs: dict[str, ParameterSpec] = {}
    for key, value in space_cfg.parameters.items():
        where = f"{file.at('parameters', key)}parameters.{key}"
        if problem := _tunable_problem(key):
            problems.append(f"{where}: {problem}")
            continue
        try:
            spec = parse_parameter(key, value)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        bad = [(v, p) for v in spec.ends() for p in _config_problems(base_raw, {key: v})]
        problems += [f"{where}: value {v!r} makes an invalid config: {p}" for v, p in bad]
        if not bad:
            specs[key] = spec

    c = space_cfg
    if c.metric is None:
        metric, greater = base.registry.metric, base.registry.greater_is_better
        if metric not in METRIC_GREATER_IS_BETTER:
            problems.append(
                f"metric: unset, and the config's registry.metric {metric!r} is not a metric every trial logs: set "
                f"metric: to one of {', '.join(METRIC_GREATER_IS_BETTER)}"
            )
    else:
        metric, greater = c.metric, METRIC_GREATER_IS_BETTER.get(c.metric, False)
        if c.metric not in METRIC_GREATER_IS_BETTER:
            problems.append(
                f"{file.at('metric')}metric: {c.metric!r} is not a metric every trial logs: use one of "
                f"{', '.join(METRIC_GREATER_IS_BETTER)}"
            )
    if metric == "finetuned_exact_match" and base.evaluation.task_metric != "exact_match":
        problems.append("metric: finetuned_exact_match needs evaluation.task_metric: exact_match in the config")
    if c.pruning.pruner != "none":
        if metric not in PRUNABLE_METRICS:
            problems.append(
                f"{file.at('pruning', 'pruner')}pruning.pruner: {c.pruning.pruner} compares the eval loss trials "
                f"report while they train, so the sweep's metric must fall with it ({' or '.join(PRUNABLE_METRICS)}), "
                f"not {metric}: set metric: finetuned_eval_loss, or pruner: none"
            )
        max_steps = base.training.max_steps
        if "training.max_steps" not in specs and max_steps > 0 and c.pruning.eval_every_steps >= max_steps:
            problems.append(
                f"{file.at('pruning', 'eval_every_steps')}pruning.eval_every_steps: {c.pruning.eval_every_steps} is "
                f"not below training.max_steps {max_steps}: trials would end before they report; lower it"
            )

    n_trials = c.n_trials
    if specs and len(specs) == len(c.parameters):
        grid_size = math.prod(len(s.choices) for s in specs.values() if s.kind == "choice")
        ranges = [k for k, s in specs.items() if s.kind != "choice"]
        if c.method == "grid":
            if ranges:
                problems += [
                    f"{file.at('parameters', k)}parameters.{k}: {specs[k].describe()} is a range, and method grid "
                    "needs a list of values: list them, or use method: random"
                    for k in ranges
                ]
            elif n_trials is not None and n_trials != grid_size:
                what = "larger than" if grid_size > n_trials else "smaller than"
                problems.append(
                    f"{file.at('n_trials')}n_trials: the grid has {grid_size} combinations, {what} n_trials "
                    f"{n_trials}: drop n_trials (or set it to {grid_size}) to run every combination, or use method: "
                    f"random to sample {n_trials}"
                )
            else:
                n_trials = grid_size
                if grid_size <= MAX_CHECKED_COMBINATIONS and len(specs) > 1:
                    for combo in itertools.product(*(s.choices for s in specs.values())):
                        values = dict(zip(specs, combo, strict=True))
                        for p in _config_problems(base_raw, values):
                            problems.append(f"parameters: the combination {values} makes an invalid config: {p}")
        elif n_trials is None:
            problems.append(f"n_trials: required for method {c.method} (how many trials to draw)")
        elif len(specs) > 1 and 2 ** len(specs) <= MAX_CHECKED_COMBINATIONS:
            for combo in itertools.product(*(s.ends() for s in specs.values())):
                values = dict(zip(specs, combo, strict=True))
                for p in _config_problems(base_raw, values):
                    problems.append(f"parameters: the combination {values} makes an invalid config: {p}")
    if problems:
        raise SweepSpaceError(list(dict.fromkeys(problems)), name)
    return SweepSpace(name, file.text, c, specs, n_trials, metric, greater, base, file.lines)
