"""lm-evaluation-harness suites on the base and the fine-tuned model: `evaluation.suites` in the config.

The harness does the evaluating (its tasks, prompts, filters, metrics and standard errors) through its Python API:
`simple_evaluate` with an `HFLM` built around the model the flow already loaded, so the 4-bit base loads once; the
adapter is switched off for the base's scores and on for the fine-tuned ones. This module only says which tasks a
suite runs and turns the harness's results into MLflow metrics.

Tasks come in three kinds: harness task or group names (their data comes from the hub), local task YAML files in
the harness's own format, and two offline tasks built here at run time, so that the whole feature runs without the
hub and the repository carries no third-party text:
- `qlora_general_text`: rolling log-likelihood (word / byte perplexity, bits per byte) on English prose taken from
  the documentation of Python's standard library as installed: a forgetting check on text that is not the task;
- `qlora_heldout`: the run's task on its held-out split, generative, exact match after the harness's filters (the
  prompt as training rendered it, the reference answer stripped of surrounding whitespace).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline_config.evaluation import BUILT_IN_TASKS, GENERAL_TEXT_TASK, HELDOUT_TASK, SuiteConfig
from pipeline_config.schema import PipelineConfig
from qlora.inference import without_router_aux_loss
from qlora.stages import starting_policy

SUITE_VERSION_TAG = "harness.suite_version."  # + suite name: what its scores are comparable with (suite_version)
METRIC_PREFIX = "harness"  # MLflow: harness/<task>/<metric> (fine-tuned), base_harness/<task>/<metric> (base)
# Python's standard library, whose documentation is the general-text task's prose (fixed order: same text each run
# on one Python version; the task's data digest says which text it was).
PROSE_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging",
    "pathlib", "pickle", "random", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "typing", "unittest", "urllib.request", "zipfile",
)  # fmt: skip
MIN_PARAGRAPH_CHARS = 300
GENERAL_TEXT_DOCUMENTS = 64


@dataclass
class SuiteResult:
    """One suite's harness results for base and fine-tuned (each `simple_evaluate`'s dict, samples included)."""

    suite: SuiteConfig
    base: dict[str, Any] | None  # None for a model without an adapter to switch off (a merged model)
    finetuned: dict[str, Any]
    data_digests: dict[str, str] = field(default_factory=dict)  # offline task -> digest of the documents it built
    champion: dict[str, Any] | None = None  # the champion's harness results, when it had to be scored (qlora/gate.py)
    champion_version: str | None = None  # the comparable champion's registry version, when there is one
    # its scores on this suite's current version ({task: {metric: value}}); None when it has none (a suite changed)
    champion_scores: dict[str, dict[str, float]] | None = None


def general_text_documents(n: int = GENERAL_TEXT_DOCUMENTS) -> list[str]:
    """Paragraphs of English prose (at least MIN_PARAGRAPH_CHARS each) from the standard library's docstrings."""
    paragraphs: list[str] = []
    for name in PROSE_MODULES:
        module = importlib.import_module(name)
        members = [module] + [m for _, m in sorted(vars(module).items()) if inspect.isclass(m) or inspect.isfunction(m)]
        for member in members:
            for block in re.split(r"\n\s*\n", inspect.getdoc(member) or ""):
                text = " ".join(block.split())
                # prose, not code or tables: sentences, few symbols
                if len(text) >= MIN_PARAGRAPH_CHARS and text.count(">>>") == 0 and text.endswith("."):
                    paragraphs.append(text)
    unique = list(dict.fromkeys(paragraphs))
    return unique[:n]


def heldout_documents(data, tokenizer) -> list[dict[str, str]]:
    """The held-out rows as {prompt, answer}: the prompt rendered as training rendered it (chat rows through the
    chat template, with the generation prompt), the answer stripped."""
    from qlora.data import eval_prompt_and_reference

    docs = []
    for row in data.eval:
        prompt, answer = eval_prompt_and_reference(row, data.kind, data.response_template)
        if prompt is None:
            continue
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        docs.append({"prompt": prompt, "answer": answer.strip()})
    return docs


def _write_jsonl(rows: list[dict], path: Path) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _json_task(name: str, path: Path, **spec) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "metadata": {"version": 1.0},
        **spec,
    }


def built_in_task(name: str, folder: Path, data=None, tokenizer=None, max_gen_toks: int = 256):
    """(harness task config, digest of its documents) of an offline task, its documents written under `folder`."""
    if name == GENERAL_TEXT_TASK:
        path = folder / f"{GENERAL_TEXT_TASK}.jsonl"
        digest = _write_jsonl([{"text": t} for t in general_text_documents()], path)
        spec = {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": m, "aggregation": a, "higher_is_better": False}
                for m, a in (
                    ("word_perplexity", "weighted_perplexity"),
                    ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"),
                )
            ],
        }
        return _json_task(GENERAL_TEXT_TASK, path, **spec), digest
    path = folder / f"{HELDOUT_TASK}.jsonl"
    digest = _write_jsonl(heldout_documents(data, tokenizer), path)
    spec = {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
        # the harness's own filters: the answer without surrounding whitespace, then exact match
        "filter_list": [
            {
                "name": "strip",
                "filter": [{"function": "regex", "regex_pattern": r"(?s)^\s*(.*?)\s*$"}, {"function": "take_first"}],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    return _json_task(HELDOUT_TASK, path, **spec), digest


def is_task_file(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def suite_problems(cfg: PipelineConfig) -> list[str]:
    """Every problem with `evaluation.suites` and `registry.guards` that needs files or the harness's task index, one
    line each: an unknown task name, a task YAML that is missing or malformed, a guard naming a task no suite runs.
    Loads no weights (`validate` and the preflight call it)."""
    problems, names = [], set()
    harness_names = []
    for i, suite in enumerate(cfg.evaluation.suites):
        for entry in suite.tasks:
            where = f"evaluation.suites[{i}] ({suite.name}) task {entry!r}"
            if entry in BUILT_IN_TASKS:
                names.add(entry)
            elif is_task_file(entry):
                name, problem = _task_file_name(Path(entry))
                if problem:
                    problems.append(f"{where}: {problem}")
                else:
                    names.add(name)
            else:
                harness_names.append((where, entry))
    if harness_names:
        from lm_eval.tasks import TaskManager

        known = TaskManager().all_tasks
        for where, entry in harness_names:
            if entry in known:
                names.add(entry)
                continue
            from pipeline_config.loading import did_you_mean

            problems.append(
                f"{where} is not a task or group lm-evaluation-harness knows{did_you_mean(entry, known)}: give a "
                "harness task name, a task YAML file, or one of " + ", ".join(BUILT_IN_TASKS)
            )
    for guard in cfg.registry.guards:
        # a task a suite lists, or a subtask of a group it lists (mmlu_anatomy of mmlu)
        if guard.task not in names and not any(guard.task.startswith(f"{n}_") for n in names):
            problems.append(
                f"registry.guards task {guard.task!r} is not run by any suite in evaluation.suites: add it to one"
            )
    return problems


def _task_file_name(path: Path) -> tuple[str | None, str | None]:
    """(the task name a harness task YAML defines, None) or (None, what is wrong with it)."""
    if not path.is_file():
        return None, "no such task file: give the path of a harness task YAML"
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark else ""
        return None, f"{at}not valid YAML ({getattr(exc, 'problem', exc)})"
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
        return None, "a harness task YAML needs a top-level `task: <name>` (see the harness's task guide)"
    missing = [k for k in ("dataset_path", "output_type", "doc_to_text") if k not in spec and "include" not in spec]
    if missing:
        return None, f"missing {', '.join(missing)} (a harness task YAML names its data, output type and prompt)"
    return spec["task"], None


def suite_tasks(suite: SuiteConfig, folder: Path, data, tokenizer) -> tuple[list, dict[str, str], Any]:
    """(the harness `tasks` argument, offline task -> data digest, a TaskManager that knows the YAML files)."""
    from lm_eval.tasks import TaskManager

    tasks, digests, include = [], {}, []
    for entry in suite.tasks:
        if entry in BUILT_IN_TASKS:
            spec, digests[entry] = built_in_task(entry, folder, data, tokenizer, suite.max_gen_toks)
            tasks.append(spec)
        elif is_task_file(entry):
            include.append(str(Path(entry).resolve().parent))
            tasks.append(_task_file_name(Path(entry))[0])
        else:
            tasks.append(entry)
    manager = TaskManager(include_path=sorted(set(include)) or None)
    return tasks, digests, manager


def evaluate_with_harness(model, tokenizer, suite: SuiteConfig, tasks: list, manager) -> dict[str, Any]:
    """One `simple_evaluate` of `tasks` on the in-memory `model` (whatever its adapter state), with the suite's
    settings."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=suite.batch_size, max_length=_max_length(model))
    with without_router_aux_loss(model):  # generative tasks decode a padded batch: see the context manager
        return simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=suite.num_fewshot,
            limit=suite.limit,
            task_manager=manager,
            apply_chat_template=suite.apply_chat_template,
            gen_kwargs={"max_gen_toks": suite.max_gen_toks},
            log_samples=True,
            bootstrap_iters=1000,
        )


def _max_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def run_suites(peft_model, tokenizer, suites: list[SuiteConfig], data, folder: Path) -> list[SuiteResult]:
    """Every suite on the model as the run started (the base, adapter off; a stage's starting adapter) and the
    fine-tuned model: the same tasks, documents and settings for both."""
    results = []
    peft_model.eval()
    for suite in suites:
        tasks, digests, manager = suite_tasks(suite, folder / suite.name, data, tokenizer)
        base = None
        if hasattr(peft_model, "disable_adapter"):  # a merged model has no base to compare with
            with starting_policy(peft_model):
                base = evaluate_with_harness(peft_model, tokenizer, suite, tasks, manager)
        tuned = evaluate_with_harness(peft_model, tokenizer, suite, tasks, manager)
        results.append(SuiteResult(suite, base, tuned, digests))
    return results


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value, metric_stderr: value}} from a harness results dict (filter names dropped; N/A and
    non-finite values left out)."""
    scores: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            metric = key.split(",", 1)[0]
            scores.setdefault(task, {})[metric] = float(value)
    return scores


def suite_metrics(results: list[SuiteResult]) -> dict[str, float]:
    """MLflow metrics: harness/<task>/<metric> (fine-tuned) and base_harness/<task>/<metric> (base), standard errors
    as <metric>_stderr."""
    metrics = {}
    for result in results:
        for prefix, run in ((METRIC_PREFIX, result.finetuned), (f"base_{METRIC_PREFIX}", result.base)):
            for task, values in task_scores(run or {"results": {}}).items():
                metrics |= {f"{prefix}/{task}/{metric}": value for metric, value in values.items()}
    return metrics


def suite_version(result: SuiteResult) -> str:
    """What a score is comparable with: the harness version, each task's version and its data digest."""
    versions = result.finetuned.get("versions", {})
    parts = {"lm_eval": result.finetuned.get("lm_eval_version"), "tasks": versions, "data": result.data_digests}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _sample_columns(samples: list[dict]) -> dict[str, list]:
    """A task's per-sample outputs as table columns: the prompt, the reference, the model's (filtered) answer and
    each metric of the sample."""
    metric_names = sorted({m for s in samples for m in s.get("metrics", [])})
    columns: dict[str, list] = {"doc_id": [], "prompt": [], "target": [], "response": []}
    columns |= {m: [] for m in metric_names}
    for s in samples:
        columns["doc_id"].append(s["doc_id"])
        columns["prompt"].append(str(s["arguments"][0][0])[-2000:])
        columns["target"].append(str(s.get("target", ""))[:2000])
        columns["response"].append(str(s["filtered_resps"][0])[:2000] if s.get("filtered_resps") else "")
        for m in metric_names:
            value = s.get(m)
            columns[m].append(float(value) if isinstance(value, int | float) else str(value))
    return columns


def log_suite_results(results: list[SuiteResult]) -> dict[str, float]:
    """Into the active MLflow run: every task's metrics for base and fine-tuned with their standard errors, each
    run's results JSON and per-sample outputs (an MLflow table per task), and the harness and task versions as tags.
    Returns the metrics."""
    import mlflow

    metrics = suite_metrics(results)
    mlflow.log_metrics(metrics)
    for result in results:
        folder = f"harness/{result.suite.name}"
        tags = {
            "harness.lm_eval_version": str(result.finetuned.get("lm_eval_version")),
            SUITE_VERSION_TAG + result.suite.name: suite_version(result),
        }
        tags |= {f"harness.task_version.{t}": str(v) for t, v in result.finetuned.get("versions", {}).items()}
        tags |= {f"harness.data_digest.{t}": d for t, d in result.data_digests.items()}
        mlflow.set_tags(tags)
        for which, run in (("base", result.base), ("finetuned", result.finetuned)):
            if run is None:
                continue
            mlflow.log_dict(_plain({k: v for k, v in run.items() if k != "samples"}), f"{folder}/{which}_results.json")
            for task, samples in run.get("samples", {}).items():
                mlflow.log_table(_sample_columns(samples), artifact_file=f"{folder}/{which}_{task}_samples.json")
    return metrics


def _change(value: float, other: float | None, higher: bool, stderr: float | None) -> tuple[float | None, bool]:
    """(value - other, whether that is worse by more than the standard error); (None, False) with nothing to compare."""
    if other is None:
        return None, False
    change = value - other
    return change, (-change if higher else change) > (stderr or 0.0)


def comparison_rows(results: list[SuiteResult]) -> list[dict[str, Any]]:
    """One row per task and metric: base, fine-tuned, the champion (its version, when one is comparable), the
    changes, the standard error, and whether the fine-tuned model regressed against the base and against the champion
    (worse by more than one standard error; by anything, where the harness gives none)."""
    rows = []
    for result in results:
        base, tuned = task_scores(result.base or {"results": {}}), task_scores(result.finetuned)
        champion = result.champion_scores or {}
        directions = result.finetuned.get("higher_is_better", {})
        for task, values in tuned.items():
            for metric, value in values.items():
                if metric.endswith("_stderr"):
                    continue
                stderr = values.get(f"{metric}_stderr")
                higher = directions.get(task, {}).get(metric, True)
                before, theirs = base.get(task, {}).get(metric), champion.get(task, {}).get(metric)
                change, worse = _change(value, before, higher, stderr)
                change_vs_champion, worse_than_champion = _change(value, theirs, higher, stderr)
                rows.append(
                    {
                        "suite": result.suite.name,
                        "task": task,
                        "metric": metric,
                        "base": before,
                        "finetuned": value,
                        "champion": theirs,
                        "champion_version": result.champion_version if theirs is not None else None,
                        "change": change,
                        "change_vs_champion": change_vs_champion,
                        "stderr": stderr,
                        "higher_is_better": higher,
                        "regressed": worse,
                        "regressed_vs_champion": worse_than_champion,
                    }
                )
    return rows
