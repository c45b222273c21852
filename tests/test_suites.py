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


@pytest.mark.slow
def test_the_flows_scores_match_the_harness_own_run_on_the_embedded_default(tmp_path):
    """On the embedded default (SmolLM2-135M-Instruct, 4-bit as the flow loads it), the offline suite's scores from
    run_suites (the in-memory model; adapter off, then on) match `lm_eval.simple_evaluate` loading the same model
    itself (`--model hf` on the saved 4-bit checkpoint; with `peft=` for the adapter): every metric within its
    standard error, and the same generated answers."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from pipeline_config.evaluation import SuiteConfig
    from pipeline_config.loading import load_pipeline_config
    from qlora.data import load_dataset_splits
    from qlora.model import compute_dtype_of, load_quantized_model
    from qlora.model_source import resolve_model_source
    from qlora.suites import built_in_task, run_suites, task_scores

    cfg = load_pipeline_config(Path("pipeline_config/default.yaml"), [f"model.cache_dir={tmp_path / 'models'}"])
    source = resolve_model_source(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    base = load_quantized_model(source, cfg.quantization, "cpu")
    checkpoint, adapter = tmp_path / "nf4", tmp_path / "adapter"
    base.save_pretrained(checkpoint)  # the 4-bit weights exactly as the flow holds them, for the harness to load
    tokenizer.save_pretrained(checkpoint)
    torch.manual_seed(0)  # a random adapter (B not zero), small enough to leave the model talking
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=2, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(adapter)
    data = load_dataset_splits(cfg.data)
    tasks = ["qlora_general_text", "qlora_heldout"]
    suite = SuiteConfig(name="offline", tasks=tasks, limit=6, batch_size=6, max_gen_toks=32)
    [ours] = run_suites(peft_model, tokenizer, [suite], data, tmp_path / "suites")

    tasks = [built_in_task(name, tmp_path / "direct", data, tokenizer, 32)[0] for name in suite.tasks]
    dtype = compute_dtype_of(cfg.quantization, "cpu")  # what load_quantized_model loaded it in ("auto" settled)
    for flows_run, model_args in (
        (ours.base, {"pretrained": str(checkpoint), "dtype": dtype}),
        (ours.finetuned, {"pretrained": str(checkpoint), "dtype": dtype, "peft": str(adapter)}),
    ):
        theirs = simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=tasks,
            limit=6,
            batch_size=6,
            device="cpu",
            gen_kwargs={"max_gen_toks": 32},
            task_manager=TaskManager(),
            log_samples=True,
        )
        mine, direct = task_scores(flows_run), task_scores(theirs)
        assert mine.keys() == direct.keys() == {"qlora_general_text", "qlora_heldout"}
        for task, values in mine.items():
            for metric, value in values.items():
                if metric.endswith("_stderr"):
                    continue
                stderr = values.get(f"{metric}_stderr") or 0.0
                assert abs(value - direct[task][metric]) <= max(stderr, 1e-4 * abs(value)), (task, metric)
        answers = [s["filtered_resps"] for s in flows_run["samples"]["qlora_heldout"]]
        assert any(str(a[0]).strip() for a in answers), answers  # it did generate: the comparison means something
        assert answers == [s["filtered_resps"] for s in theirs["samples"]["qlora_heldout"]]
    # the adapter was on for the fine-tuned scores: they differ from the base's
    base_bpb = task_scores(ours.base)["qlora_general_text"]["bits_per_byte"]
    assert task_scores(ours.finetuned)["qlora_general_text"]["bits_per_byte"] != pytest.approx(base_bpb)


def _suite_result(name: str, scores: dict[str, dict[str, float]], higher: dict[str, dict[str, bool]]):
    from pipeline_config.evaluation import SuiteConfig
    from qlora.suites import SuiteResult

    def run(values):
        results = {t: {f"{m},none": v for m, v in ms.items()} for t, ms in values.items()}
        return {"results": results, "higher_is_better": higher, "versions": dict.fromkeys(values, 1.0)}

    return SuiteResult(SuiteConfig(name=name, tasks=sorted(scores)), run(scores), run(scores), {"t": "d"})


@pytest.mark.parametrize(
    ("guard", "promoted"),
    [
        ({"max_regression": 0.05}, False),  # accuracy 0.70 -> 0.60: a loss of 0.10 > 0.05
        ({"max_regression": 0.15}, True),
        ({"max_regression_stderr": 1.0}, False),  # 0.10 > 1 x stderr 0.02
        ({"max_regression_stderr": 6.0}, True),
    ],
)
def test_the_gate_keeps_a_challenger_that_regresses_past_a_guard(tmp_path, tiny_config_file, guard, promoted):
    """The challenger beats the champion on registry.metric; a guard on a harness score decides, and the reason
    names the guard with both numbers, on the run's decision and the version's tags."""
    from mlflow import MlflowClient

    from pipeline_config.loading import load_pipeline_config
    from qlora.gate import SUITE_VERSION_TAG, guard_check_for
    from qlora.registry import decide_champion
    from qlora.suites import suite_version

    guards = f"registry.guards=[{{task: arc, metric: acc, {next(iter(guard))}: {next(iter(guard.values()))}}}]"
    cfg = load_pipeline_config(tiny_config_file, [guards])
    client = MlflowClient(f"sqlite:///{tmp_path / 'registry.db'}")
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=str(tmp_path))
    result = _suite_result("general", {"arc": {"acc": 0.60, "acc_stderr": 0.02}}, {"arc": {"acc": True}})
    champion_tags = {
        "dataset_digest": "d",
        "metric.finetuned_exact_match": "0.5",
        "metric.harness/arc/acc": "0.70",
        "metric.harness/arc/acc_stderr": "0.02",
        SUITE_VERSION_TAG + "general": suite_version(result),
    }
    for key, value in champion_tags.items():
        client.set_model_version_tag("m", "1", key, value)
    client.set_registered_model_alias("m", "champion", "1")

    metrics = {"finetuned_exact_match": 0.9, "harness/arc/acc": 0.60}
    check = guard_check_for(cfg, metrics, [result])
    decision = decide_champion(client, "m", "2", 0.9, "d", cfg, check)
    assert decision.became_champion is promoted
    assert "finetuned_exact_match 0.9000 beats champion v1's 0.5000" in decision.reason
    assert "arc/acc 0.6 vs champion 0.7" in decision.reason
    assert ("REGRESSED" in decision.reason) is not promoted
    assert str(client.get_model_version_by_alias("m", "champion").version) == ("2" if promoted else "1")


def test_a_champion_without_scores_for_the_suite_version_is_not_compared_on_old_ones(tiny_config_file):
    """Scores of another suite version (another harness, task version or data) are not the champion's scores for
    this one: it must be scored first (qlora/gate.py `unscored_suites`)."""
    from types import SimpleNamespace

    from pipeline_config.loading import load_pipeline_config
    from qlora.gate import SUITE_VERSION_TAG, champion_metrics, unscored_suites
    from qlora.suites import suite_version

    cfg = load_pipeline_config(tiny_config_file, ["registry.guards=[{task: arc, metric: acc, max_regression: 0.1}]"])
    result = _suite_result("general", {"arc": {"acc": 0.6}}, {"arc": {"acc": True}})
    stale = SimpleNamespace(tags={"metric.harness/arc/acc": "0.7", SUITE_VERSION_TAG + "general": "older"})
    assert unscored_suites(stale, cfg, [result]) == [result] and champion_metrics(stale, [result]) == {}
    current = SimpleNamespace(tags={**stale.tags, SUITE_VERSION_TAG + "general": suite_version(result)})
    assert unscored_suites(current, cfg, [result]) == []
    assert champion_metrics(current, [result]) == {"harness/arc/acc": 0.7}


@pytest.mark.slow
def test_a_champion_without_scores_is_scored_first_through_the_flow(prefect_server, tiny_llama_dir, tmp_path):
    """Champion v1 was registered before any suite ran. The next run's guarded suite scores v1 first (its adapter on
    the same in-memory base), writes the scores on v1's version, and decides against them."""
    from mlflow import MlflowClient

    from flows.finetune import finetune
    from tests.conftest import train_tiny_champion

    _, raw = train_tiny_champion(tiny_llama_dir, tmp_path, "gated", max_steps=2)
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    assert not any(k.startswith("metric.harness/") for k in client.get_model_version("gated", "1").tags)

    config = tmp_path / "tiny.yaml"  # written by train_tiny_champion
    guard = "registry.guards=[{task: qlora_general_text, metric: bits_per_byte, max_regression: 100.0}]"
    metric = "registry.metric=train_steps"  # 6 steps beat the champion's 2: the guards then decide
    summary = finetune(config_path=str(config), overrides=[OFFLINE_SUITE, guard, metric, "training.max_steps=4"])
    scored = client.get_model_version("gated", "1").tags
    assert (
        scored["harness.suite_version.offline"]
        == client.get_model_version("gated", "2").tags["harness.suite_version.offline"]
    )
    champion_bpb = float(scored["metric.harness/qlora_general_text/bits_per_byte"])
    run = client.get_run(summary["mlflow_run_id"])
    assert champion_bpb != pytest.approx(run.data.metrics["base_harness/qlora_general_text/bits_per_byte"])
    reason = summary["registry"]["reason"]
    assert summary["registry"]["became_champion"], reason
    assert "guards hold: qlora_general_text/bits_per_byte" in reason and f"champion {champion_bpb:.4g}" in reason
    # the Prefect table: base vs fine-tuned vs champion v1, one row per task and metric
    rows = {(r["task"], r["metric"]): r for r in _suites_table(run.data.tags["prefect.flow_run_id"])}
    bpb = rows[("qlora_general_text", "bits_per_byte")]
    assert bpb["champion"] == pytest.approx(champion_bpb, rel=1e-5) and bpb["champion_version"] == "1"
    assert bpb["change_vs_champion"] == pytest.approx(bpb["finetuned"] - bpb["champion"])
    assert bpb["regressed_vs_champion"] == (bpb["finetuned"] - bpb["champion"] > 0)  # lower is better; no stderr
    assert rows[("qlora_heldout", "exact_match")]["champion"] is not None  # unguarded tasks of the suite too


def _suites_table(flow_run_id: str) -> list[dict]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return json.loads(next(a.data for a in artifacts if a.key == "qlora-harness-suites"))


@pytest.mark.slow
def test_evaluate_scores_every_registered_version_and_records_it(prefect_server, tiny_llama_dir, tmp_path, capsys):
    """`qlora-flow evaluate --all-versions` on a registry URI: per version an MLflow run of the scores and the scores
    on the version's tags (what the gate compares a challenger with)."""
    from mlflow import MlflowClient

    from tests.conftest import train_tiny_champion

    _, raw = train_tiny_champion(tiny_llama_dir, tmp_path, "scored", max_steps=2)
    uri = raw["tracking"]["tracking_uri"]
    client = MlflowClient(uri)
    first = client.get_model_version("scored", "1")
    client.create_model_version("scored", first.source, run_id=first.run_id)  # v2: a second version to re-score
    args = ["evaluate", "--model", "models:/scored@champion", "--config", str(tmp_path / "tiny.yaml")]
    args += ["--set", OFFLINE_SUITE, "--tracking-uri", uri, "--output-dir", str(tmp_path / "evaluations")]
    assert main([*args, "--all-versions"]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "harness/qlora_general_text/bits_per_byte" in out and "scored 2 model(s)" in out
    runs = [line.split()[2] for line in out.splitlines() if line.startswith("MLflow run ")]
    for version, run_id in zip(("1", "2"), runs, strict=True):
        assert f"scores on scored/{version}'s tags" in out
        tags = client.get_model_version("scored", version).tags
        run = client.get_run(run_id)
        assert run.data.tags["qlora.kind"] == "evaluation"
        assert run.data.tags["evaluated_model"] == f"models:/scored/{version}"
        bits = run.data.metrics["harness/qlora_general_text/bits_per_byte"]
        assert float(tags["metric.harness/qlora_general_text/bits_per_byte"]) == pytest.approx(bits, rel=1e-5)
        assert tags["harness.suite_version.offline"] == run.data.tags["harness.suite_version.offline"]
    # all versions of a folder is an input error, before any model loads
    assert main([*args[:2], str(tmp_path), *args[3:], "--all-versions"]) == 2
    assert "all_versions needs a registered model" in capsys.readouterr().err


def test_a_guard_in_standard_errors_on_a_metric_without_one_blocks_and_says_why(tiny_config_file):
    from types import SimpleNamespace

    from pipeline_config.loading import load_pipeline_config
    from qlora.gate import SUITE_VERSION_TAG, guard_check_for
    from qlora.suites import suite_version

    guard = "registry.guards=[{task: prose, metric: bits_per_byte, max_regression_stderr: 2}]"
    cfg = load_pipeline_config(tiny_config_file, [guard])
    result = _suite_result("s", {"prose": {"bits_per_byte": 1.0}}, {"prose": {"bits_per_byte": False}})
    champion = SimpleNamespace(
        tags={"metric.harness/prose/bits_per_byte": "1.1", SUITE_VERSION_TAG + "s": suite_version(result)}
    )
    passed, found = guard_check_for(cfg, {"harness/prose/bits_per_byte": 1.0}, [result])(champion)
    assert not passed and found == (
        "prose/bits_per_byte 1 vs champion 1.1: the harness gives no standard error for it: "
        "bound it with max_regression"
    )
