"""Preflight: every check on config, data and tokenizer that needs no model weights, reported all at once.

Runs as `qlora-flow validate`, and in the flow as the `preflight` step after the tokenizer and the data, before
any weights load. Fatal problems stop the run (exit code 2); the rest are warnings in the report.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from pipeline_config.schema import PipelineConfig, cuda_only_problems
from qlora.chat_template import decide_assistant_only_loss
from qlora.config_checks import library_setting_problems
from qlora.data import STAGE_KINDS, DatasetSplits, held_out_overlap
from qlora.errors import PipelineInputError
from qlora.evaluate import chat_token_ids
from qlora.model_source import ModelSource, file_digest
from qlora.services import resolve_tracking_uri, tracking_store_problem


class PreflightError(PipelineInputError):
    """Fatal preflight findings; the message lists all of them."""


@dataclass
class PreflightReport:
    fatal: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    loss: str | None = None  # which tokens the loss is on, and why (training.assistant_only_loss resolved)
    family: str | None = None  # the model family and its fast-path parts (qlora/families.py), rendered

    def render(self) -> str:
        lines = ["preflight:"]
        if self.family:
            lines += [f"  {line}" for line in self.family.splitlines()]
        s = self.stats
        if s:
            lines.append(
                f"  train rows {s['rows']:.0f}; tokens per row min {s['tokens_min']:.0f} / mean {s['tokens_mean']:.0f} "
                f"/ p95 {s['tokens_p95']:.0f} / max {s['tokens_max']:.0f}; "
                f"{s['rows_truncated']:.0f} row(s) longer than max_seq_length {s['max_seq_length']:.0f}"
            )
        if self.loss:
            lines.append(f"  {self.loss}")
        lines += [f"  FATAL: {p}" for p in self.fatal]
        lines += [f"  warning: {p}" for p in self.warnings]
        if not self.fatal:
            lines.append("  ok")
        return "\n".join(lines)


def rendered_ids(data: DatasetSplits, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of each training row as the trainer sees it (chat template, or text + EOS as TRL appends it)."""
    eos = tokenizer.eos_token
    if data.kind == "messages":
        return [chat_token_ids(tokenizer, m, add_generation_prompt=False) for m in data.train["messages"]]
    if data.kind in STAGE_KINDS:
        return [stage_row_ids(row, data.kind, tokenizer) for row in data.train]
    if data.kind == "text":
        texts = [t if t.endswith(eos) else t + eos for t in data.train["text"]]
    else:
        texts = [
            p + (c if c.endswith(eos) else c + eos)
            for p, c in zip(data.train["prompt"], data.train["completion"], strict=True)
        ]
    return tokenizer(texts)["input_ids"]


def stage_row_ids(row: dict, kind: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """A stage's row as its trainer renders it: the prompt with its longest answer (GRPO: the prompt alone, with the
    generation prompt; its completions are sampled)."""
    prompt = row["prompt"]
    answers = [row[k] for k in ("chosen", "rejected", "completion") if k in row]
    if isinstance(prompt, list):
        if not answers:
            return chat_token_ids(tokenizer, prompt, add_generation_prompt=True)
        return max((chat_token_ids(tokenizer, prompt + a, add_generation_prompt=False) for a in answers), key=len)
    if not answers:
        return tokenizer(prompt)["input_ids"]
    eos = tokenizer.eos_token
    return max((tokenizer(prompt + a + ("" if a.endswith(eos) else eos))["input_ids"] for a in answers), key=len)


def _ends_with_eos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> bool:
    """EOS is the last token, allowing for whitespace a chat template writes after it."""
    for tid in reversed(ids):
        if tid == tokenizer.eos_token_id:
            return True
        if tokenizer.decode([tid]).strip():
            return False
    return False


def writable_problem(folder: str) -> str | None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as exc:
        return f"training.output_dir {folder} is not writable ({exc.strerror or exc}): choose another folder"
    return None


def lora_target_problems(cfg: PipelineConfig, source: ModelSource) -> list[str]:
    """`lora.target_modules` checked against the architecture built on the meta device (no weights read).
    peft would silently adapt only the names that match."""
    from qlora.architecture import target_module_problems

    if cfg.lora.target_modules == "all-linear":
        return []
    return target_module_problems(cfg.model, cfg.lora, source.path, source.gguf_file)


def family_check(cfg: PipelineConfig, source: ModelSource, device: str, report: PreflightReport) -> None:
    """The model family and its fast-path parts (into the report), a family this project cannot train (fatal), and
    `lora.target_parameters` against the experts of the architecture built on the meta device."""
    from qlora.architecture import build_meta_model, read_model_config
    from qlora.families import family_report
    from qlora.model import expert_lora_targets, is_mixture_of_experts

    config = read_model_config(cfg.model, source.path, source.gguf_file)
    if config is None:
        return  # the model-source check reports an unreadable model
    needs_modules = cfg.lora.target_parameters or is_mixture_of_experts(config)
    meta = build_meta_model(cfg.model, source.path, source.gguf_file) if needs_modules else None
    family = family_report(cfg, config, device, meta)
    report.family = family.render()
    if family.refusal:
        report.fatal.append(family.refusal)
    if family.warning:
        report.warnings.append(family.warning)
    if cfg.lora.target_parameters and meta is not None:
        try:
            expert_lora_targets(meta, cfg.lora.target_parameters)
        except PipelineInputError as exc:
            report.fatal.append(str(exc))


def sequence_length_problem(cfg: PipelineConfig, source: ModelSource) -> str | None:
    """`training.max_seq_length` against the positions the model was built for (read from its config, no weights):
    beyond them the position encoding is extrapolated and training or generation degrade or fail."""
    from qlora.architecture import context_length, read_model_config

    config = read_model_config(cfg.model, source.path, source.gguf_file)
    limit = context_length(config) if config is not None else None
    if limit is not None and cfg.training.max_seq_length > limit:
        family = type(config).__name__.removesuffix("Config")
        return (
            f"training.max_seq_length {cfg.training.max_seq_length} is beyond the {limit} positions {family} was "
            f"built for (max_position_embeddings): set at most {limit}"
        )
    return None


def overlap_problem(cfg: PipelineConfig, data: DatasetSplits, report: PreflightReport) -> None:
    """The held-out rows must not be training rows: the same file for both is an error, a partial overlap a warning
    with its share."""
    d = cfg.data
    if (
        d.eval_source
        and d.eval_source == d.source
        or (
            d.eval_source
            and Path(d.source).is_file()
            and Path(d.eval_source).is_file()
            and file_digest(Path(d.source)) == file_digest(Path(d.eval_source))
        )
    ):
        report.fatal.append(
            f"data.eval_source {d.eval_source} holds the same rows as data.source: the held-out score would measure "
            "memorization; give a separate held-out file, or drop eval_source to hold out a share of data.source"
        )
        return
    shared, total = held_out_overlap(data)
    if shared == total:
        report.fatal.append(
            f"all {total} held-out rows are also training rows: the held-out score would measure memorization; "
            "give a separate held-out set"
        )
    elif shared:
        report.warnings.append(
            f"{shared} of {total} held-out rows ({100 * shared / total:.1f} %) are also training rows: their score "
            "measures memorization; de-duplicate the data"
        )


def run_preflight(
    cfg: PipelineConfig, source: ModelSource, data: DatasetSplits, tokenizer: PreTrainedTokenizerBase, device: str
) -> PreflightReport:
    report = PreflightReport()
    t = cfg.training
    if device == "cpu":
        report.fatal += cuda_only_problems(cfg)
    report.fatal += library_setting_problems(cfg)
    if cfg.evaluation.suites or cfg.registry.guards:
        from qlora.suites import suite_problems

        report.fatal += suite_problems(cfg)  # unknown tasks, malformed task files, unguarded guards
    if cfg.registry.next_stages:
        from qlora.stages import next_stage_problems

        report.fatal += next_stage_problems(cfg)
    if cfg.distributed.launcher == "ray":
        from qlora.ray_launch import ray_problems

        report.fatal += ray_problems(cfg)  # Ray missing, an address nobody answers at: seconds, not Ray's minutes
    if problem := tracking_store_problem(resolve_tracking_uri(cfg.tracking)):
        report.fatal.append(problem)
    if problem := writable_problem(t.output_dir):
        report.fatal.append(problem)
    report.fatal += lora_target_problems(cfg, source)
    family_check(cfg, source, device, report)
    if problem := sequence_length_problem(cfg, source):
        report.fatal.append(problem)
    overlap_problem(cfg, data, report)
    if data.is_conversational and not tokenizer.chat_template:
        report.fatal.append("chat data but the tokenizer has no chat template: set tokenizer.chat_template_file")
    if t.completion_only_loss and data.kind != "prompt_completion":
        report.fatal.append(f"training.completion_only_loss needs prompt/completion rows; the data is {data.kind!r}")
    if t.method == "sft":
        try:  # the same decision train_adapter makes
            wrapped = t.packing and t.packing_strategy == "wrapped"
            report.loss = decide_assistant_only_loss(t.assistant_only_loss, data.kind, tokenizer, wrapped).reason
        except PipelineInputError as exc:
            report.fatal.append(str(exc))
    else:
        from qlora.stages import stage_input_problems

        report.fatal += stage_input_problems(cfg, data, source)
    if data.kind == "prompt_completion":
        empty = sum(1 for c in data.train["completion"] if not c.strip())
        if empty:
            report.fatal.append(f"{empty} training row(s) have an empty completion: nothing to learn there")
    if data.kind == "text" and data.response_template:
        missing = sum(1 for x in data.eval["text"] if data.response_template not in x)
        if missing:
            report.warnings.append(
                f"{missing} held-out row(s) lack data.response_template {data.response_template!r}: no answer to score"
            )
    if report.fatal and data.is_conversational and not tokenizer.chat_template:
        return report  # rows cannot be rendered without a template
    ids = rendered_ids(data, tokenizer)
    lengths = [len(x) for x in ids]
    truncated = sum(n > t.max_seq_length for n in lengths)
    report.stats = {
        "rows": float(len(lengths)),
        "tokens_min": float(min(lengths)),
        "tokens_mean": statistics.fmean(lengths),
        "tokens_p95": float(sorted(lengths)[int(0.95 * (len(lengths) - 1))]),
        "tokens_max": float(max(lengths)),
        "rows_truncated": float(truncated),
        "max_seq_length": float(t.max_seq_length),
    }
    if truncated == len(lengths):
        report.fatal.append(
            f"every training row is longer than training.max_seq_length {t.max_seq_length} (shortest: "
            f"{min(lengths)} tokens): raise max_seq_length"
        )
    elif truncated:
        report.warnings.append(
            f"{truncated} of {len(lengths)} training rows exceed max_seq_length {t.max_seq_length}: they are cut and "
            "lose their EOS"
        )
    no_eos = sum(not _ends_with_eos(x, tokenizer) for x in ids) if data.kind != "prompt_only" else 0
    if no_eos:
        report.fatal.append(
            f"{no_eos} training row(s) do not end with the EOS token {tokenizer.eos_token!r}: the model would never "
            "learn to stop; fix the chat template or the data"
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        report.warnings.append(
            "pad token == EOS: TRL masks padding by position, so EOS stays trained, but set a distinct "
            "tokenizer.pad_token if the vocabulary has one"
        )
    return report


def check_preflight(cfg, source, data, tokenizer, device) -> PreflightReport:
    """Run the preflight; raise PreflightError listing every fatal problem."""
    report = run_preflight(cfg, source, data, tokenizer, device)
    if report.fatal:
        raise PreflightError("preflight failed:\n" + "\n".join(f"  - {p}" for p in report.fatal))
    return report


def preflight_from_config(config: str | Mapping | PipelineConfig | None, overrides: list[str] | None = None):
    """Everything `qlora-flow validate` checks: config, model source, data, tokenizer, preflight. No weights load and
    no GGUF conversion (the tokenizer and architecture come from the GGUF header)."""
    from pipeline_config.loading import load_pipeline_config
    from qlora.data import load_dataset_splits
    from qlora.model import pick_device
    from qlora.model_source import resolve_model_source
    from qlora.tokenizer import setup_tokenizer

    cfg = config if isinstance(config, PipelineConfig) else load_pipeline_config(config, overrides)
    source = resolve_model_source(cfg.model, convert=False)
    device = pick_device(cfg.training.device)
    data = load_dataset_splits(cfg.data)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, data.is_conversational)
    return cfg, source, data, device, check_preflight(cfg, source, data, tokenizer, device)
