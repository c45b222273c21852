"""lm-evaluation-harness suites (qlora/suites.py): the offline tasks, bad input found before any weights load, the
suites through the flow (MLflow metrics and artifacts, the Prefect table), and scores equal to the harness's own run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from qlora.suites import general_text_documents

OFFLINE_SUITE = "evaluation.suites=[{name: offline, tasks: [qlora_general_text, qlora_heldout], limit: 4, batch_size: 4, max_gen_toks: 16}]"  # noqa: E501


def test_general_text_is_prose_built_the_same_each_time():
    docs = general_text_documents()
    assert len(docs) >= 32 and all(len(d) >= 300 and ">>>" not in d and d.endswith(".") for d in docs)
    assert docs == general_text_documents()  # the same documents on every run of this Python


def _validate(config: Path, *overrides: str) -> int:
    return main(["validate", "--config", str(config), *(a for o in overrides for a in ("--set", o))])


def test_bad_suites_are_input_errors_before_any_weights_load(tiny_config_file, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: mine\ndataset_path: json\n  output_type: [\n")
    no_task = tmp_path / "no_task.yaml"
    no_task.write_text(yaml.safe_dump({"dataset_path": "json", "output_type": "generate_until"}))
    suite = f"evaluation.suites=[{{name: s, tasks: [qlora_general_text, {broken}, {no_task}, arc_eazy]}}]"
    guard = "registry.guards=[{task: hellaswag, metric: acc_norm, max_regression: 0.01}]"
    assert _validate(tiny_config_file, suite, guard) == 2
    err = capsys.readouterr().err
    assert f"task '{broken}': line 3: not valid YAML" in err
    assert f"task '{no_task}': a harness task YAML needs a top-level `task: <name>`" in err
    assert "task 'arc_eazy' is not a task or group lm-evaluation-harness knows (did you mean 'arc_easy'?)" in err
    assert "registry.guards task 'hellaswag' is not run by any suite" in err
    limit = "evaluation.suites=[{name: s, tasks: [qlora_general_text], limit: 0}]"
    assert _validate(tiny_config_file, limit) == 2
    assert "limit" in capsys.readouterr().err
    both = "registry.guards=[{task: t, metric: m, max_regression: 1, max_regression_stderr: 2}]"
    assert _validate(tiny_config_file, both) == 2
    assert "give one of max_regression, max_regression_stderr" in capsys.readouterr().err


@pytest.mark.slow
def test_scores_equal_the_harness_run_directly_on_the_same_model(tiny_llama_dir, tmp_path):
    """The base's scores from run_suites (the in-memory model, adapter off) equal `lm_eval.simple_evaluate` loading
    the same checkpoint itself, on the same task file and limit."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline_config.evaluation import SuiteConfig
    from qlora.suites import run_suites, task_scores

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in general_text_documents(6)))
    task_file = tmp_path / "prose.yaml"
    task_file.write_text(
        yaml.safe_dump(
            {
                "task": "prose_ppl",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(docs)}},
                "test_split": "test",
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": "bits_per_byte"}, {"metric": "word_perplexity"}],
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    suite = SuiteConfig(name="prose", tasks=[str(task_file)], limit=4, batch_size=2)
    [ours] = run_suites(peft_model, tokenizer, [suite], None, tmp_path / "suites")

    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_llama_dir), "dtype": "float32"},
        tasks=["prose_ppl"],
        limit=4,
        batch_size=2,
        device="cpu",
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    base, direct = task_scores(ours.base)["prose_ppl"], task_scores(theirs)["prose_ppl"]
    assert base == pytest.approx(direct, rel=1e-5)
    # the adapter (random, not zero) changes the fine-tuned scores: they come from the adapter switched on
    assert task_scores(ours.finetuned)["prose_ppl"]["bits_per_byte"] != pytest.approx(base["bits_per_byte"])
