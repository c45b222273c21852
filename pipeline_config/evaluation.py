"""The config sections that decide whether a fine-tune is good: held-out evaluation, the lm-evaluation-harness suites
run on base and fine-tuned, and the registry's rule for promoting a version (its metric and its guards).

Part of the one typed config (pipeline_config/schema.py puts them in `PipelineConfig`). Checks that need files or
the harness's task index (an unknown task name, a malformed task YAML, a guard naming a task no suite runs) are
qlora/suites.py's, run by `validate` and the preflight before any weights load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline_config.section import Section

# The offline tasks the project builds at run time (qlora/suites.py): no hub, no third-party text in the repository.
GENERAL_TEXT_TASK = "qlora_general_text"
HELDOUT_TASK = "qlora_heldout"
BUILT_IN_TASKS = (GENERAL_TEXT_TASK, HELDOUT_TASK)


class SuiteConfig(Section):
    """A named set of lm-evaluation-harness tasks, run on the base (adapter off) and the fine-tuned model (adapter
    on) with the same settings."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$", description="Suite name (letters, digits, _ . -): the summary table's label."
    )
    tasks: list[str] = Field(
        min_length=1,
        description=f"Harness task or group names (arc_easy, hellaswag, mmlu, gsm8k: their data comes from the hub), "
        f"paths of local task YAML files in the harness's own format (e.g. dataset_path: json with data_files), or "
        f"the offline tasks built at run time: '{GENERAL_TEXT_TASK}' (rolling log-likelihood on English prose from "
        f"Python's own documentation: a forgetting check) and '{HELDOUT_TASK}' (the run's task on its held-out split: "
        f"generative, exact match after the harness's filters).",
    )
    limit: int | None = Field(default=None, ge=1, description="At most this many documents per task (unset: all).")
    num_fewshot: int | None = Field(
        default=None, ge=0, description="Few-shot examples per prompt (unset: each task's own setting)."
    )
    batch_size: int = Field(default=8, gt=0, description="Requests per forward pass (generation and log-likelihood).")
    max_gen_toks: int = Field(default=256, gt=0, description="Longest answer a generative task generates.")
    apply_chat_template: bool = Field(
        default=False, description="Format each prompt with the tokenizer's chat template (instruct models)."
    )


class EvaluationConfig(Section):
    """Held-out evaluation of the base and the fine-tuned model, and the harness suites run on both."""

    max_loss_rows: int = Field(default=200, gt=0, description="Held-out rows for eval loss / perplexity.")
    max_generation_rows: int = Field(default=100, ge=0, description="Held-out rows for greedy generation.")
    max_new_tokens: int = Field(default=64, gt=0, description="Generation length limit per answer.")
    batch_size: int = Field(default=16, gt=0, description="Rows per evaluation batch.")
    task_metric: Literal["exact_match", "none"] = Field(
        default="exact_match", description="Metric on greedy generations: exact match of the stripped answer."
    )
    samples_to_log: int = Field(default=20, ge=0, description="Eval samples saved as an artifact table.")
    suites: list[SuiteConfig] = Field(
        default_factory=list,
        description="lm-evaluation-harness suites (step evaluate-suites, after training): every task's metrics for "
        "base and fine-tuned go to MLflow as harness/<task>/<metric>; registry.guards gate promotion on them.",
    )

    @model_validator(mode="after")
    def _unique_suite_names(self) -> EvaluationConfig:
        names = [s.name for s in self.suites]
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"evaluation.suites: each suite needs its own name; repeated: {', '.join(repeated)}")
        return self


class GuardConfig(Section):
    """A harness score a new champion may not lose: promotion is refused when the challenger's `metric` on `task`
    is worse than the champion's by more than the bound."""

    task: str = Field(min_length=1, description="Harness task name (one a suite runs).")
    metric: str = Field(min_length=1, description="Its metric, as the harness names it (acc_norm, bits_per_byte...).")
    max_regression: float | None = Field(
        default=None, ge=0, description="Largest allowed loss, in the metric's own units (e.g. 0.01 accuracy)."
    )
    max_regression_stderr: float | None = Field(
        default=None, ge=0, description="Largest allowed loss, in standard errors of the champion's score."
    )

    @model_validator(mode="after")
    def _one_bound(self) -> GuardConfig:
        if (self.max_regression is None) == (self.max_regression_stderr is None):
            raise ValueError(
                f"registry.guards ({self.task}/{self.metric}): give one of max_regression, max_regression_stderr"
            )
        return self


class RegistryConfig(Section):
    """MLflow model registry: every successful run registers a version; aliases pick champion/challenger."""

    enabled: bool = Field(default=True, description="Register a model version at the end of each successful run.")
    model_name: str | None = Field(
        default=None, description="Registered model name. Unset: derived from the base model and dataset names."
    )
    metric: str = Field(
        default="finetuned_exact_match",
        description="Run metric that decides the champion (compared only between versions of the same dataset digest).",
    )
    greater_is_better: bool = Field(default=True, description="Direction of `metric` (false for losses).")
    max_new_tokens: int = Field(default=128, gt=0, description="Generation length of the served model's predict().")
    guards: list[GuardConfig] = Field(
        default_factory=list,
        description="Harness scores a challenger may not lose against the champion (same suite version) to be "
        "promoted, whatever registry.metric says.",
    )
    next_stages: list[str] = Field(
        default_factory=list,
        description="Configs of the stages to run on a new champion of this run (e.g. pipeline_config/align-dpo.yaml): "
        "its promotion emits one `qlora.champion.promoted` event per stage, which the qlora-align deployment's "
        "trigger turns into a run of that config starting from the new champion's version (prefect.yaml).",
    )
