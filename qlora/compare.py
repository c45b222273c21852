"""`qlora-flow compare`: the same prompts through the base model and the fine-tuned one, side by side.

For an adapter, the base is the same loaded model with the adapter switched off (peft's `disable_adapter`): identical
4-bit weights and numerics, as the flow's evaluation does. For a merged model, the base is loaded from what the
merge recorded (`merge_info.json`), de-quantized into the merged model's dtype the same way the merge did.
Prompts default to the run's first held-out prompts, shown with their expected answers.

Output: a table in the terminal, plus `compare.jsonl` and `compare.md` in the output folder; with an MLflow run id,
both are logged to that run under `compare/`.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from qlora.errors import PipelineInputError
from qlora.files import atomic_folder, check_output_target
from qlora.inference import LoadedModel, SamplingSettings, as_prompt, generate_texts


@dataclass
class ComparedPrompt:
    prompt: str | list
    base: str
    finetuned: str
    expected: str | None = None

    def shown_prompt(self) -> str:
        return self.prompt[-1]["content"] if isinstance(self.prompt, list) else self.prompt


def held_out_prompts(loaded: LoadedModel, n: int) -> tuple[list, list[str]]:
    """The first `n` held-out prompts of the run the adapter came from, and their expected answers."""
    from qlora.data import eval_prompt_and_reference
    from qlora.merge import held_out_rows

    if loaded.config is None:
        raise PipelineInputError("compare: give prompts (--prompt or --prompts FILE): this model has no run config")
    data = held_out_rows(loaded, "compare asks its prompts when none are given: or pass --prompt / --prompts")
    rows = data.eval.select(range(min(n, len(data.eval))))
    pairs = [eval_prompt_and_reference(r, data.kind, data.response_template) for r in rows]
    pairs = [(p, ref.strip()) for p, ref in pairs if p is not None]
    return [p for p, _ in pairs], [ref for _, ref in pairs]


def base_answers(loaded: LoadedModel, prompts: list, settings: SamplingSettings, batch_size: int) -> list[str]:
    if loaded.kind == "adapter":
        with loaded.model.disable_adapter():
            return generate_texts(loaded.model, loaded.tokenizer, prompts, settings, batch_size)
    base = _merged_models_base(loaded)
    answers = generate_texts(base, loaded.tokenizer, prompts, settings, batch_size)
    del base
    return answers


def _merged_models_base(loaded: LoadedModel):
    """The base a merged model was merged into: the run's 4-bit base, de-quantized into the same dtype."""
    from pipeline_config.schema import ModelConfig, QuantizationConfig
    from qlora.merge import dequantized_base

    info = loaded.info
    if not info.get("base_model"):
        raise PipelineInputError(
            f"compare: {loaded.source} has no merge_info.json naming its base: compare the adapter instead"
        )
    weight = next(loaded.model.parameters())
    model_cfg, quant_cfg = ModelConfig(**info["base_model"]), QuantizationConfig(**info["quantization"])
    return dequantized_base(model_cfg, quant_cfg, weight.dtype, weight.device.type).eval()


def compare(
    loaded: LoadedModel,
    prompts: list | None,
    settings: SamplingSettings,
    batch_size: int = 8,
    n_held_out: int = 8,
) -> list[ComparedPrompt]:
    """Base and fine-tuned answers to `prompts` (or to the run's first held-out prompts)."""
    expected: list = []
    if prompts is None:
        prompts, expected = held_out_prompts(loaded, n_held_out)
    prompts = [as_prompt(p, loaded.has_chat_template) for p in prompts]
    base = base_answers(loaded, prompts, settings, batch_size)
    tuned = generate_texts(loaded.model, loaded.tokenizer, prompts, settings, batch_size)
    expected = expected or [None] * len(prompts)
    return [ComparedPrompt(p, b, f, e) for p, b, f, e in zip(prompts, base, tuned, expected, strict=True)]


def format_table(rows: list[ComparedPrompt], width: int = 120) -> str:
    """A plain-text side-by-side table (wrapped columns) for the terminal."""
    has_expected = any(r.expected is not None for r in rows)
    headers = ["prompt", "base", "fine-tuned"] + (["expected"] if has_expected else [])
    col = max(16, (width - 3 * (len(headers) - 1)) // len(headers))
    lines = [" | ".join(h.ljust(col) for h in headers), "-+-".join("-" * col for _ in headers)]
    for r in rows:
        cells = [r.shown_prompt(), r.base, r.finetuned] + ([r.expected or ""] if has_expected else [])
        wrapped = [textwrap.wrap(c.replace("\n", " "), col) or [""] for c in cells]
        for i in range(max(len(w) for w in wrapped)):
            lines.append(" | ".join((w[i] if i < len(w) else "").ljust(col) for w in wrapped))
        lines.append("-+-".join("-" * col for _ in headers))
    return "\n".join(lines)


def markdown_report(rows: list[ComparedPrompt], source: str, settings: SamplingSettings) -> str:
    def cell(text: str | None) -> str:
        return (text or "").replace("|", "\\|").replace("\n", "<br>")

    has_expected = any(r.expected is not None for r in rows)
    sampling = "greedy" if settings.temperature == 0 else f"temperature {settings.temperature}, top-p {settings.top_p}"
    lines = [
        f"# Base vs fine-tuned: {source}",
        "",
        f"{len(rows)} prompts, {sampling}, at most {settings.max_new_tokens} new tokens.",
        "",
        "| prompt | base | fine-tuned |" + (" expected |" if has_expected else ""),
        "| --- | --- | --- |" + (" --- |" if has_expected else ""),
    ]
    for r in rows:
        extra = f" {cell(r.expected)} |" if has_expected else ""
        lines.append(f"| {cell(r.shown_prompt())} | {cell(r.base)} | {cell(r.finetuned)} |{extra}")
    if has_expected:
        base_hits = sum(r.base == r.expected for r in rows)
        tuned_hits = sum(r.finetuned == r.expected for r in rows)
        lines += [
            "",
            f"Exact match with the expected answer: base {base_hits}/{len(rows)}, fine-tuned {tuned_hits}/{len(rows)}.",
        ]
    return "\n".join(lines) + "\n"


REPORT_FILES = ("compare.jsonl", "compare.md")


def is_compare_report(folder: Path) -> bool:
    """True for a folder holding only what `write_report` writes (what `--overwrite` may replace)."""
    names = {p.name for p in Path(folder).iterdir()}
    return bool(names) and names <= set(REPORT_FILES)


def check_report_folder(out_dir: Path, overwrite: bool = False) -> None:
    """Raise PipelineInputError unless `out_dir` is new, empty, or (with `overwrite`) an earlier compare report."""
    check_output_target(out_dir, "--out-dir", is_folder=True, overwrite=overwrite, written_by_us=is_compare_report)


def write_report(
    rows: list[ComparedPrompt],
    out_dir: Path,
    source: str,
    settings: SamplingSettings,
    mlflow_run_id: str | None,
    tracking_uri: str | None = None,
    overwrite: bool = False,
) -> Path:
    """`compare.jsonl` + `compare.md` into `out_dir` (written whole, then moved into place); logged to the MLflow
    run `mlflow_run_id` under `compare/` if given. An existing folder is replaced only with `overwrite` and only
    when it holds an earlier report and nothing else (`check_report_folder`)."""
    out_dir = Path(out_dir)
    check_report_folder(out_dir, overwrite)
    with atomic_folder(out_dir, replace=True) as tmp:
        with (tmp / "compare.jsonl").open("w") as fh:
            for r in rows:
                record = {"prompt": r.prompt, "base": r.base, "finetuned": r.finetuned, "expected": r.expected}
                fh.write(json.dumps(record) + "\n")
        (tmp / "compare.md").write_text(markdown_report(rows, source, settings))
    if mlflow_run_id:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri).log_artifacts(mlflow_run_id, str(out_dir), artifact_path="compare")
        except MlflowException as exc:
            raise PipelineInputError(f"--mlflow-run {mlflow_run_id}: {exc.message.splitlines()[0]}") from None
    return out_dir
