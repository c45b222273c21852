"""Settings of the training stages after SFT: preference training (DPO, KTO) and GRPO with verifiable rewards.

`training.method` picks the stage; each runs through TRL's own trainer (qlora/stages.py). A stage starts from the
base model or from an earlier adapter (`model.adapter`), which DPO, KTO and GRPO keep as their frozen reference
policy.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from pipeline_config.section import Section

TrainingMethod = Literal["sft", "dpo", "kto", "grpo"]

# What each method trains on: the data formats (data.format after detection) it accepts.
METHOD_DATA_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "text", "alpaca", "prompt_completion"),
    "dpo": ("preference",),
    "kto": ("unpaired_preference",),
    "grpo": ("prompt_only",),
}

BUILT_IN_REWARDS = ("valid_json", "json_schema", "field_match", "exact_match")
ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class RewardConfig(Section):
    """One reward function of a GRPO stage."""

    function: str = Field(
        description="A built-in reward (valid_json, json_schema, field_match, exact_match) or a user reward as a "
        "Python entry point 'module:function', called as function(prompts, completions, **columns) -> list of "
        "floats (TRL's reward-function signature; the dataset's other columns come as keyword lists)."
    )
    weight: float = Field(default=1.0, description="Weight of this reward in the sum GRPO advantages are taken of.")
    json_schema: dict | None = Field(
        default=None, description="json_schema: the JSON Schema a completion must match (reward 1, else 0)."
    )
    fields: list[str] | None = Field(
        default=None,
        description="field_match: the fields compared with the expected answer (default: every field it has).",
    )

    @model_validator(mode="after")
    def _known_function(self) -> RewardConfig:
        if self.function not in BUILT_IN_REWARDS and not ENTRY_POINT.fullmatch(self.function):
            raise ValueError(
                f"reward function {self.function!r} is neither a built-in reward "
                f"({', '.join(BUILT_IN_REWARDS)}) nor an entry point 'module:function'"
            )
        if self.function == "json_schema" and not self.json_schema:
            raise ValueError("the json_schema reward needs its json_schema")
        return self

    @property
    def name(self) -> str:
        """The name its metrics are logged under."""
        return self.function.split(":")[-1]


class PolicyRejectedConfig(Section):
    """DPO on the starting model's own mistakes. Before training, the starting policy answers the training prompts
    (greedy, batched: the model the stage starts from, as it would answer); wherever its answer scores below the
    chosen answer on `reward`, that answer becomes the row's rejected one. Rows it answers as well as the chosen
    answer keep their own rejected answer. The pairs are then on-policy where it matters: the mistakes this model
    makes, not ones imagined for it."""

    reward: RewardConfig = Field(
        default_factory=lambda: RewardConfig(function="exact_match"),
        description="How an answer is scored against the row's chosen answer (passed to it as `answer`): a built-in "
        "reward (exact_match, field_match, json_schema, valid_json) or a user entry point 'module:function', as in "
        "grpo.rewards. An answer scoring below the chosen answer's own score is a mistake.",
    )
    max_prompts: int | None = Field(
        default=None, gt=0, description="Answer at most this many training rows (the first); default: all of them."
    )
    max_new_tokens: int = Field(default=128, gt=0, description="New tokens per answer (greedy).")
    batch_size: int = Field(default=16, gt=0, description="Prompts answered per batch (left-padded, per process).")


class PreferenceConfig(Section):
    """DPO and KTO (TRL's DPOTrainer / KTOTrainer): how strongly the policy may move from its reference."""

    beta: float = Field(
        default=0.1,
        gt=0,
        description="Strength of the pull towards the reference policy (the starting model): smaller moves further.",
    )
    loss_type: str | list[str] | None = Field(
        default=None,
        description="TRL's loss_type of the trainer (DPO: sigmoid, ipo, hinge, ..., or a list of them summed with "
        "loss_weights, e.g. [sigmoid, sft] for DPO plus the chosen answers' SFT loss (RPO); KTO: kto, "
        "apo_zero_unpaired); default: the trainer's own.",
    )
    loss_weights: list[float] | None = Field(
        default=None,
        description="DPO: the weight of each loss_type in the list (default: 1 each), e.g. [1.0, 0.2].",
    )
    policy_rejected: PolicyRejectedConfig | None = Field(
        default=None,
        description="DPO: replace a row's rejected answer by the starting model's own answer wherever that answer is "
        "wrong (scored against the chosen one), so the pairs hold the mistakes this model actually makes.",
    )
    desirable_weight: float = Field(default=1.0, gt=0, description="KTO: weight of the rows labelled desirable.")
    undesirable_weight: float = Field(default=1.0, gt=0, description="KTO: weight of the rows labelled undesirable.")

    @model_validator(mode="after")
    def _weights_match_losses(self) -> PreferenceConfig:
        if self.loss_weights is not None:
            losses = self.loss_type if isinstance(self.loss_type, list) else None
            if losses is None or len(losses) != len(self.loss_weights):
                raise ValueError(
                    f"preference.loss_weights: {len(self.loss_weights)} weight(s) need a loss_type list of as many "
                    f"losses (loss_type is {self.loss_type!r})"
                )
        return self


class GrpoConfig(Section):
    """GRPO (TRL's GRPOTrainer): completions sampled per prompt, scored by reward functions, no value model."""

    num_generations: int = Field(
        default=4, ge=2, description="Completions sampled per prompt (the group its advantages are relative to)."
    )
    max_completion_length: int = Field(default=128, gt=0, description="New tokens per sampled completion.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the completions.")
    beta: float = Field(
        default=0.04,
        ge=0,
        description="Weight of the KL term to the reference policy (the starting model); 0 drops the reference.",
    )
    rewards: list[RewardConfig] = Field(
        default_factory=lambda: [RewardConfig(function="field_match")],
        min_length=1,
        description="Reward functions, summed with their weights.",
    )
