"""Evaluate the base and the fine-tuned model side by side on the held-out rows.

- eval loss / perplexity over the answer tokens (prompt tokens are masked, as in completion-only scoring;
  'text' rows without a response template are scored over the whole text);
- a task metric from greedy generations: exact match of the stripped answer;
- for answers that are JSON objects (structured output): the share of answers that are valid JSON, and per field the
  share of answers with that field right (`field_accuracy/date`: how often the date is right).
The base model is the same in-memory PEFT model with its adapter disabled, so both numbers come from identical
4-bit weights and numerics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from pipeline_config.evaluation import EvaluationConfig
from qlora.data import DatasetSplits, eval_prompt_and_reference


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[str] = field(default_factory=list)
    prompts: list = field(default_factory=list)  # chat turns or strings, aligned with predictions
    references: list[str] = field(default_factory=list)


def chat_token_ids(tokenizer, turns: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of chat turns rendered with the tokenizer's chat template."""
    rendered = tokenizer.apply_chat_template(
        turns, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(rendered["input_ids"])


def scored_examples(data: DatasetSplits, tokenizer: PreTrainedTokenizerBase, max_rows: int, max_len: int):
    """(input_ids, labels) per held-out row; labels mask the prompt with -100."""
    examples = []
    for row in data.eval.select(range(min(max_rows, len(data.eval)))):
        if data.kind == "messages":
            full = chat_token_ids(tokenizer, row["messages"], add_generation_prompt=False)
            prompt = chat_token_ids(tokenizer, row["messages"][:-1], add_generation_prompt=True)
        else:
            prompt_text, answer = eval_prompt_and_reference(row, data.kind, data.response_template)
            if prompt_text is None and data.kind != "text":
                continue  # a stage's row without a reference answer (a completion labelled undesirable)
            if prompt_text is None:  # plain text: score everything
                prompt_text, answer = "", row["text"]
            if isinstance(prompt_text, list):  # a stage's chat prompt
                answer_turn = {"role": "assistant", "content": answer}
                full = chat_token_ids(tokenizer, [*prompt_text, answer_turn], add_generation_prompt=False)
                prompt = chat_token_ids(tokenizer, prompt_text, add_generation_prompt=True)
                examples.append(_labelled(full[:max_len], prompt))
                continue
            full = tokenizer(prompt_text + answer)["input_ids"]
            prompt = tokenizer(prompt_text)["input_ids"] if prompt_text else []
            if full[-1] != tokenizer.eos_token_id:
                full = full + [tokenizer.eos_token_id]
        examples.append(_labelled(full[:max_len], prompt))
    return examples


def _labelled(full: list[int], prompt: list[int]) -> tuple[list[int], list[int]]:
    n_prompt = len(prompt) if full[: len(prompt)] == prompt else 0
    return full, [-100] * n_prompt + full[n_prompt:]


@torch.inference_mode()
def eval_loss(model, tokenizer, examples, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (x, y) in enumerate(batch):
            ids[j, : len(x)] = torch.tensor(x)
            labels[j, : len(y)] = torch.tensor(y)
            mask[j, : len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += loss.item()
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def greedy_answers(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy generations for chat or string prompts, batched with left padding."""
    from qlora.inference import SamplingSettings, generate_texts

    return generate_texts(model, tokenizer, prompts, SamplingSettings(max_new_tokens=max_new_tokens), batch_size)


def evaluate_model(model, tokenizer, data: DatasetSplits, cfg: EvaluationConfig, max_len: int) -> EvalResult:
    """Eval loss, perplexity, greedy answers for the first held-out rows, and their exact match if configured."""
    model.eval()
    loss = eval_loss(model, tokenizer, scored_examples(data, tokenizer, cfg.max_loss_rows, max_len), cfg.batch_size)
    result = EvalResult(metrics={"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))})
    rows = data.eval.select(range(min(cfg.max_generation_rows, len(data.eval))))
    pairs = [eval_prompt_and_reference(r, data.kind, data.response_template) for r in rows]
    pairs = [p for p in pairs if p[0] is not None]  # 'text' rows without the response template have no answer
    if not pairs:
        return result
    result.prompts = [p for p, _ in pairs]
    result.references = [ref.strip() for _, ref in pairs]
    result.predictions = greedy_answers(model, tokenizer, result.prompts, cfg.max_new_tokens, cfg.batch_size)
    if cfg.task_metric == "exact_match":
        hits = sum(p == r for p, r in zip(result.predictions, result.references, strict=True))
        result.metrics["exact_match"] = 100.0 * hits / len(pairs)
        result.metrics["generation_rows"] = float(len(pairs))
    result.metrics |= structured_output_metrics(result.predictions, result.references)
    return result


def structured_output_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """When every reference is a JSON object: `json_valid` (% of predictions that are one JSON value and nothing
    else) and `field_accuracy/<field>` (% of predictions with the reference's value in that field). {} otherwise."""
    from qlora.rewards import parsed_json

    expected = [parsed_json(r) for r in references]
    if not expected or not all(ok and isinstance(value, dict) for ok, value in expected):
        return {}
    got = [parsed_json(p) for p in predictions]
    metrics = {"json_valid": 100.0 * sum(ok for ok, _ in got) / len(got)}
    fields = list(dict.fromkeys(name for _, value in expected for name in value))
    for name in fields:
        right = sum(
            ok and isinstance(value, dict) and name in ref and value.get(name) == ref[name]
            for (ok, value), (_, ref) in zip(got, expected, strict=True)
        )
        metrics[f"field_accuracy/{name}"] = 100.0 * right / len(got)
    return metrics


@dataclass
class Comparison:
    base: EvalResult
    finetuned: EvalResult
    samples: list[dict]


def evaluate_base_and_finetuned(
    peft_model, tokenizer, data: DatasetSplits, cfg: EvaluationConfig, max_len: int
) -> Comparison:
    """Same held-out rows, the model as the run started (the base, adapter off; a stage's starting adapter), then
    fine-tuned."""
    from qlora.stages import starting_policy

    with starting_policy(peft_model):
        base = evaluate_model(peft_model, tokenizer, data, cfg, max_len)
    tuned = evaluate_model(peft_model, tokenizer, data, cfg, max_len)
    samples = [
        {
            "prompt": p[-1]["content"] if isinstance(p, list) else p,
            "expected": r,
            "base_output": b,
            "finetuned_output": f,
        }
        for p, r, b, f in zip(base.prompts, base.references, base.predictions, tuned.predictions, strict=True)
    ][: cfg.samples_to_log]
    return Comparison(base=base, finetuned=tuned, samples=samples)
