"""The registry's gate on harness scores (`registry.guards`): a challenger that beats the champion on
`registry.metric` is promoted only when no guarded score regresses past its bound against the champion's score on
the same suite version.

The champion's scores come from its version's tags (`metric.harness/<task>/<metric>` and
`harness.suite_version.<suite>`, written when it was registered or scored). A champion without scores for a guarded
suite's version is scored first, not skipped: its adapter (from its run's artifacts) is loaded beside this run's on
the same in-memory 4-bit base, the suite runs with it switched on, and its scores are written onto its version.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline_config.evaluation import GuardConfig
from pipeline_config.schema import PipelineConfig
from qlora.suites import (
    METRIC_PREFIX,
    SUITE_VERSION_TAG,
    SuiteResult,
    evaluate_with_harness,
    run_suites,
    suite_tasks,
    suite_version,
    task_scores,
)

CHAMPION_ADAPTER = "champion"  # the peft adapter name the champion's weights are loaded under while it is scored


@dataclass
class GuardVerdict:
    guard: GuardConfig
    challenger: float | None
    champion: float | None
    allowed_loss: float | None
    passed: bool
    note: str = ""

    def describe(self) -> str:
        g = self.guard
        name = f"{g.task}/{g.metric}"
        if self.challenger is None or self.champion is None:
            return f"{name}: {self.note}"
        if self.allowed_loss is None:
            return f"{name} {self.challenger:.4g} vs champion {self.champion:.4g}: {self.note}"
        verdict = "ok" if self.passed else "REGRESSED"
        return (
            f"{name} {self.challenger:.4g} vs champion {self.champion:.4g} (allowed loss {self.allowed_loss:.4g}): "
            f"{verdict}"
        )


def evaluate_suites(peft_model, tokenizer, data, cfg: PipelineConfig, folder: Path) -> list[SuiteResult]:
    """The configured suites on base and fine-tuned, and the comparable champion's scores beside them: from its
    version's tags when they are of the same suite version; scored now when a guard needs them (module docstring);
    else none (`champion_scores` None: a suite changed since the champion was scored)."""
    results = run_suites(peft_model, tokenizer, cfg.evaluation.suites, data, folder)
    if cfg.registry.enabled:
        from qlora.registry import default_model_name

        champion = comparable_champion(cfg, cfg.registry.model_name or default_model_name(cfg), data.digest)
        if champion is None:
            return results
        if cfg.registry.guards and (missing := unscored_suites(champion, cfg, results)):
            score_champion(peft_model, tokenizer, champion, missing, data, folder)
        for result in results:
            result.champion_version = str(champion.version)
            result.champion_scores = recorded_scores(champion, result)
    return results


def recorded_scores(champion, result: SuiteResult) -> dict[str, dict[str, float]] | None:
    """The champion's scores on `result`'s suite, as {task: {metric: value}}: freshly scored, else from its version's
    tags when they are of the same suite version; None when it has none of this version."""
    if result.champion is not None:
        return task_scores(result.champion)
    if champion.tags.get(SUITE_VERSION_TAG + result.suite.name) != suite_version(result):
        return None
    tasks = set(result.finetuned["results"])
    scores: dict[str, dict[str, float]] = {}
    for key, raw in champion.tags.items():
        if key.startswith(f"metric.{METRIC_PREFIX}/"):
            task, metric = key.removeprefix(f"metric.{METRIC_PREFIX}/").rsplit("/", 1)
            if task in tasks:
                scores.setdefault(task, {})[metric] = float(raw)
    return scores


def comparable_champion(cfg: PipelineConfig, name: str, dataset_digest: str):
    """The champion version a new version of `name` is compared with (same dataset digest), or None."""
    try:
        champion = MlflowClient().get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    return champion if champion.tags.get("dataset_digest") == dataset_digest else None


def guarded_suites(cfg: PipelineConfig, results: list[SuiteResult]) -> list[SuiteResult]:
    tasks = {g.task for g in cfg.registry.guards}
    return [r for r in results if tasks & set(r.finetuned["results"])]


def unscored_suites(champion, cfg: PipelineConfig, results: list[SuiteResult]) -> list[SuiteResult]:
    """Guarded suites whose current version the champion has no scores for."""
    return [
        r
        for r in guarded_suites(cfg, results)
        if champion.tags.get(SUITE_VERSION_TAG + r.suite.name) != suite_version(r)
    ]


def score_champion(peft_model, tokenizer, champion, results: list[SuiteResult], data, folder: Path) -> None:
    """Run `results`' suites with the champion's adapter (its run's `adapter` artifact) switched on instead of this
    run's, on the same base; the harness results go to each SuiteResult's `champion`."""
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=champion.run_id, artifact_path="adapter", dst_path=tempfile.mkdtemp(prefix="qlora-champion-")
        )
    )
    active = peft_model.active_adapter
    peft_model.load_adapter(str(local), adapter_name=CHAMPION_ADAPTER)
    try:
        peft_model.set_adapter(CHAMPION_ADAPTER)
        for result in results:
            tasks, _, manager = suite_tasks(result.suite, folder / result.suite.name, data, tokenizer)
            result.champion = evaluate_with_harness(peft_model, tokenizer, result.suite, tasks, manager)
    finally:
        peft_model.set_adapter(active)
        peft_model.delete_adapter(CHAMPION_ADAPTER)


def score_tags(result: SuiteResult, harness_results: dict) -> dict[str, str]:
    """Version tags recording a model's scores on `result`'s suite (`harness_results`: that model's run of it)."""
    tags = {SUITE_VERSION_TAG + result.suite.name: suite_version(result)}
    for task, values in task_scores(harness_results).items():
        tags |= {f"metric.{METRIC_PREFIX}/{task}/{m}": f"{v:.6g}" for m, v in values.items()}
    return tags


def champion_tags(results: list[SuiteResult]) -> dict[str, str]:
    """Version tags that record the champion's fresh scores (`score_champion`) on its version."""
    tags: dict[str, str] = {}
    for result in results:
        if result.champion is not None:
            tags |= score_tags(result, result.champion)
    return tags


def guard_verdicts(
    cfg: PipelineConfig, metrics: dict[str, float], champion_metrics: dict[str, float], results: list[SuiteResult]
) -> list[GuardVerdict]:
    """Each guard: this run's score against the champion's, and whether the loss stays within the bound."""
    directions = {}
    for result in results:
        for task, values in result.finetuned.get("higher_is_better", {}).items():
            directions |= {(task, m): bool(h) for m, h in values.items()}
    verdicts = []
    for guard in cfg.registry.guards:
        key = f"{METRIC_PREFIX}/{guard.task}/{guard.metric}"
        mine, theirs = metrics.get(key), champion_metrics.get(key)
        if mine is None:
            verdicts.append(GuardVerdict(guard, None, theirs, None, False, "this run has no score for it"))
            continue
        if theirs is None:
            verdicts.append(GuardVerdict(guard, mine, None, None, False, "the champion has no score for it"))
            continue
        allowed = guard.max_regression
        if allowed is None:
            stderr = champion_metrics.get(f"{key}_stderr")
            if stderr is None or not math.isfinite(stderr):
                note = "the harness gives no standard error for it: bound it with max_regression"
                verdicts.append(GuardVerdict(guard, mine, theirs, None, False, note))
                continue
            allowed = guard.max_regression_stderr * stderr
        higher = directions.get((guard.task, guard.metric), True)
        loss = theirs - mine if higher else mine - theirs
        verdicts.append(GuardVerdict(guard, mine, theirs, allowed, loss <= allowed + 1e-12))
    return verdicts


def champion_metrics(champion, results: list[SuiteResult]) -> dict[str, float]:
    """The champion's harness scores for the current suite versions: freshly scored, else from its version's
    tags when they are of the same suite version."""
    scores: dict[str, float] = {}
    for result in results:
        if result.champion is not None:
            for task, values in task_scores(result.champion).items():
                scores |= {f"{METRIC_PREFIX}/{task}/{m}": v for m, v in values.items()}
        elif champion.tags.get(SUITE_VERSION_TAG + result.suite.name) == suite_version(result):
            for key, raw in champion.tags.items():
                if key.startswith(f"metric.{METRIC_PREFIX}/"):
                    scores[key.removeprefix("metric.")] = float(raw)
    return scores


def guard_check_for(cfg: PipelineConfig, metrics: dict[str, float], results: list[SuiteResult]):
    """The check `decide_champion` runs against the champion version: (every guard passed, what each found)."""

    def check(champion) -> tuple[bool, str]:
        verdicts = guard_verdicts(cfg, metrics, champion_metrics(champion, results), results)
        return all(v.passed for v in verdicts), "; ".join(v.describe() for v in verdicts)

    return check
