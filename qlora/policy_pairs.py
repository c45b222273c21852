"""DPO pairs that hold the starting model's own mistakes (`preference.policy_rejected`).

Before a DPO stage trains, the policy it starts from answers the training prompts, greedily and batched through the
project's one generation path (`qlora.inference.generate_texts`). Each answer is scored against the row's chosen
answer by the configured reward (the chosen answer scored the same way is the bar): where it falls short, the answer
becomes the row's rejected one; elsewhere the row keeps the rejected answer it came with. A preference stage then
pushes down what this model actually writes where it is wrong (on-policy pairs), rather than mistakes imagined for
it, which it may never make, while the rows it gets right still teach the contrast the dataset was written for.

The answers are written once, atomically, into the run folder (`policy-answers.jsonl`): a resumed run, a retried
task and every process of a distributed run train on the same pairs. Several processes answer a share of the prompts
each (accelerate's `split_between_processes`) and gather the answers in row order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from pipeline_config.stages import PolicyRejectedConfig
from qlora.files import write_text_atomic
from qlora.integrations.bnb_cpu import no_inference_repacking

ANSWERS_FILE = "policy-answers.jsonl"


@dataclass
class PolicyPairs:
    """The training rows with the policy's mistakes as their rejected answers, and what the policy did."""

    train: datasets.Dataset
    answered: int  # training rows the policy answered
    mistakes: int  # answers that scored below the chosen answer (now those rows' rejected answers)

    @property
    def metrics(self) -> dict[str, float]:
        right = self.answered - self.mistakes
        return {
            "stage/policy_answered": float(self.answered),
            "stage/policy_mistakes": float(self.mistakes),
            "stage/policy_exact_share": right / self.answered if self.answered else 0.0,
        }


def _text(answer) -> str:
    """An answer as text: itself, or its assistant turn's content (conversational rows)."""
    return answer[-1]["content"] if isinstance(answer, list) else answer


def _like(chosen, text: str):
    """`text` in the form of `chosen`: plain text, or one assistant turn."""
    return [{"role": "assistant", "content": text}] if isinstance(chosen, list) else text


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def answer_prompts(model, tokenizer, prompts: list, cfg: PolicyRejectedConfig) -> list[str]:
    """The policy's greedy answers to `prompts`, in order; with several processes each answers its share and every
    process gets them all (a collective: every rank calls it). One process leaves accelerate's state alone: the
    Trainer sets it up afterwards from its own arguments."""
    from qlora.inference import SamplingSettings, generate_texts

    settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens)
    was_training = model.training
    model.eval()
    # the model trains next: its 4-bit weights must stay in the layout training uses
    with no_inference_repacking(model), contextlib.ExitStack() as restore:
        restore.callback(model.train, was_training)
        if _world_size() == 1:
            return generate_texts(model, tokenizer, prompts, settings, cfg.batch_size)
        from accelerate import PartialState
        from accelerate.utils import gather_object

        with PartialState().split_between_processes(list(range(len(prompts)))) as mine:
            answers = generate_texts(model, tokenizer, [prompts[i] for i in mine], settings, cfg.batch_size)
            answered = gather_object(list(zip(mine, answers, strict=True)))
    return [text for _, text in sorted(answered)]


def read_answers(run_dir: str | Path | None) -> list[str] | None:
    """The answers an earlier attempt of this run wrote, or None."""
    if run_dir is None or not (Path(run_dir) / ANSWERS_FILE).is_file():
        return None
    lines = (Path(run_dir) / ANSWERS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["answer"] for line in lines if line.strip()]


def pairs_with_policy_rejected(
    train: datasets.Dataset, answers: list[str], cfg: PolicyRejectedConfig
) -> tuple[datasets.Dataset, int]:
    """`train` (the first len(answers) rows) with each wrong answer as its row's rejected answer; the count of them."""
    from qlora.rewards import build_reward

    reward = build_reward(cfg.reward, "preference.policy_rejected.reward")
    rows = train.select(range(len(answers)))
    chosen = [_text(c) for c in rows["chosen"]]
    prompts = rows["prompt"]
    bar = reward(prompts=prompts, completions=chosen, answer=chosen)
    scores = reward(prompts=prompts, completions=answers, answer=chosen)
    wrong = [score < best for score, best in zip(scores, bar, strict=True)]

    def rejected_of(row: dict, index: int) -> dict:
        if index < len(answers) and wrong[index]:
            return {"rejected": _like(row["chosen"], answers[index])}
        return {"rejected": row["rejected"]}

    return train.map(rejected_of, with_indices=True, desc="rejected: the policy's own mistakes"), sum(wrong)


def policy_pairs(
    model, tokenizer, train: datasets.Dataset, cfg: PolicyRejectedConfig, run_dir=None, log=None
) -> PolicyPairs:
    """The training rows with the starting policy's mistakes as rejected answers (see the module's docstring).
    `model` is the policy as the stage starts (the base with its starting adapter). With `run_dir`, the answers are
    read from there when an earlier attempt wrote them, else written there (by the first process)."""
    log = log or logging.getLogger(__name__)
    count = min(len(train), cfg.max_prompts or len(train))
    answers = read_answers(run_dir)
    if answers is not None and len(answers) == count:
        log.info("preference.policy_rejected: the starting policy's %d answers from %s", count, ANSWERS_FILE)
    else:
        log.info("preference.policy_rejected: the starting policy answers %d training prompts", count)
        answers = answer_prompts(model, tokenizer, train.select(range(count))["prompt"], cfg)
        if run_dir is not None and int(os.environ.get("RANK", "0")) == 0:
            lines = (json.dumps({"row": i, "answer": a}, ensure_ascii=False) for i, a in enumerate(answers))
            write_text_atomic(Path(run_dir) / ANSWERS_FILE, "".join(f"{line}\n" for line in lines))
    rows, mistakes = pairs_with_policy_rejected(train, answers, cfg)
    log.info(
        "preference.policy_rejected: %d of %d answers fall short of the chosen answer; they are now those rows' "
        "rejected answers",
        mistakes,
        count,
    )
    return PolicyPairs(train=rows, answered=count, mistakes=mistakes)
