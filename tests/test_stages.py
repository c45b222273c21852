"""The stages after SFT (training.method dpo / kto / grpo): rewards, data formats, the reference policy, and each
stage through the flow from a registered SFT champion."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline_config.loading import ConfigError, load_pipeline_config
from pipeline_config.stages import RewardConfig
from qlora.errors import PipelineInputError
from qlora.rewards import build_reward, exact_match, field_match_reward, json_schema_reward, reward_problems, valid_json

ANSWER = '{"name":"Elena Tanaka","item":"coffee grinder","quantity":5,"date":"2024-08-29"}'
CHAT_ANSWER = [{"role": "assistant", "content": ANSWER}]


# ---------------------------------------------------------------------------------------------------- rewards


def test_built_in_rewards_score_hand_made_completions():
    wrong_year = ANSWER.replace("2024", "2023")
    wrapped = "Sure! " + ANSWER
    completions = [ANSWER, wrong_year, wrapped, "not json", CHAT_ANSWER]
    answers = [ANSWER] * len(completions)
    assert valid_json(None, completions) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert exact_match(None, completions, answer=answers) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert field_match_reward()(None, completions, answer=answers) == [1.0, 0.75, 0.0, 0.0, 1.0]
    # only the named fields count; an expected answer given as an object works as well as JSON text
    assert field_match_reward(["date"])(None, [wrong_year], answer=[json.loads(ANSWER)]) == [0.0]
    schema = {"type": "object", "required": ["quantity"], "properties": {"quantity": {"type": "integer"}}}
    assert json_schema_reward(schema)(None, [ANSWER, '{"quantity": "5"}', "[]"]) == [1.0, 0.0, 0.0]


def test_a_user_reward_entry_point_is_loaded_and_called(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def short(prompts, completions, **kwargs):
                return [1.0 if len(c) < 10 else 0.0 for c in completions]

            def no_kwargs(prompts, completions):
                return [0.0] * len(completions)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    reward = build_reward(RewardConfig(function="my_rewards:short"))
    assert reward(prompts=["p", "p"], completions=["ok", "far too long"], answer=["a", "a"]) == [1.0, 0.0]
    with pytest.raises(PipelineInputError, match=r"my_rewards:no_kwargs cannot be a reward: it takes no \*\*kwargs"):
        build_reward(RewardConfig(function="my_rewards:no_kwargs"))
    problems = reward_problems(
        [RewardConfig(function="missing_module:f"), RewardConfig(function="my_rewards:absent")], ["prompt"]
    )
    assert "cannot import module 'missing_module'" in problems[0]
    assert "has no function 'absent'" in problems[1]
    assert "no answer column" in reward_problems([RewardConfig(function="field_match")], ["prompt"])[0]


# ---------------------------------------------------------------------------------------------------- bad input


def _config(tmp_path: Path, **sections) -> dict:
    raw = {"model": {"name_or_path": "x"}, "data": {"source": "bundled:orders"}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"training": {"method": "dpo"}, "data": {"format": "messages"}}, "training.method dpo trains on data.format"),
        (
            {"training": {"method": "grpo", "per_device_train_batch_size": 3}, "grpo": {"num_generations": 2}},
            "grpo.num_generations",
        ),
        ({"training": {"method": "grpo"}, "grpo": {"rewards": [{"function": "nonsense"}]}}, "neither a built-in"),
        ({"training": {"method": "kto", "assistant_only_loss": True}}, "SFT settings"),
        ({"training": {"method": "orpo"}}, "training.method"),
        ({"preference": {"loss_type": "sigmoid", "loss_weights": [1.0]}}, "preference.loss_weights: 1 weight"),
        ({"preference": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}}, "preference.loss_weights"),
        ({"training": {"method": "kto"}, "preference": {"loss_type": ["kto", "sft"]}}, "KTO takes one loss_type"),
        (
            {"training": {"method": "kto"}, "preference": {"policy_rejected": {}}},
            "preference.policy_rejected is for DPO",
        ),
        (
            {"training": {"method": "dpo"}, "preference": {"policy_rejected": {"reward": {"function": "nonsense"}}}},
            "preference.policy_rejected.reward.*neither a built-in",
        ),
    ],
)
def test_bad_stage_settings_are_named(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(_config(tmp_path, **sections))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "completion": "a", "label": "yes"}, r"row 2, column 'label' .* not true/false"),
        ({"prompt": "q", "chosen": CHAT_ANSWER, "rejected": "b"}, r"row 2, column 'chosen' .* but its prompt"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, r"row 2, column 'rejected' .* a number"),
    ],
)
def test_bad_stage_rows_are_named(tmp_path, row, message):
    from qlora.data import load_dataset_splits
    from qlora.errors import DataError

    good = {k: (True if k == "label" else "x") for k in row}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, row, good, good]))
    cfg = load_pipeline_config(_config(tmp_path, data={"source": str(path)})).data
    with pytest.raises(DataError, match=message):
        load_dataset_splits(cfg)


# ---------------------------------------------------------------------------------------------------- stage data


def order_stage_rows(n: int, seed: int, kind: str) -> list[dict]:
    """`n` training rows of the bundled orders in a stage's format (qlora/bundled_data.py)."""
    from qlora.bundled_data import generate_order_stage_rows

    return generate_order_stage_rows(kind, max(n, 1000), 200, seed)["train"][:n]


def test_bundled_stage_data_holds_the_sft_orders_and_typical_mistakes():
    """bundled:orders-preference / -unpaired / -prompts are the orders of bundled:orders (the same held-out orders,
    so every stage is measured on what SFT was), with a mistake of every kind the SFT model makes as the rejected
    answer: never the correct one."""
    from collections import Counter

    from pipeline_config.schema import DataConfig
    from qlora.data import load_dataset_splits
    from qlora.rewards import field_match_reward, parsed_json

    sft = load_dataset_splits(DataConfig(source="bundled:orders"))
    held_out = [row["messages"][:-1] for row in sft.eval]
    pairs = load_dataset_splits(DataConfig(source="bundled:orders-preference"))
    prompts = load_dataset_splits(DataConfig(source="bundled:orders-prompts"))
    unpaired = load_dataset_splits(DataConfig(source="bundled:orders-unpaired"))
    assert (pairs.kind, prompts.kind, unpaired.kind) == ("preference", "prompt_only", "unpaired_preference")
    for data in (pairs, prompts, unpaired):
        assert [row["prompt"] for row in data.eval] == held_out
    assert [row["answer"] for row in prompts.eval] == [row["messages"][-1]["content"] for row in sft.eval]
    chosen = [row["chosen"][0]["content"] for row in pairs.train]
    rejected = [row["rejected"][0]["content"] for row in pairs.train]
    assert all(c != r for c, r in zip(chosen, rejected, strict=True))
    scores = field_match_reward()(None, rejected, answer=chosen)
    parsed = [parsed_json(r) for r in rejected]
    kinds = Counter(
        "text" if not ok else "missing" if len(value) == 3 else "field"
        for (ok, value), score in zip(parsed, scores, strict=True)
    )
    assert kinds["text"] > 50 and kinds["missing"] > 50 and kinds["field"] > 800, kinds
    assert all(score < 1 for score in scores)
    dates = [
        (json.loads(c)["date"], value["date"])
        for c, (ok, value) in zip(chosen, parsed, strict=True)
        if ok and "date" in value and json.loads(c)["date"] != value["date"]
    ]
    assert len(dates) > 700  # the day's digits misread, wrong year, wrong day, day and month swapped
    # the SFT demo model's measured mistake (2025-09-01 -> 2025-09-11, 2026-03-31 -> 2026-03-03) is the rejected
    # answer of every order whose day comes before the month ("1 September 2025"), where the model makes it
    from qlora.bundled_data import DAY_BEFORE_MONTH

    day_first = [DAY_BEFORE_MONTH.search(row["prompt"][-1]["content"]) is not None for row in pairs.train]
    assert 0.3 < sum(day_first) / len(day_first) < 0.5
    for first, right, (ok, value) in zip(day_first, chosen, parsed, strict=True):
        if first:
            assert ok, value
            right, wrong = json.loads(right)["date"], value["date"]
            assert right[:8] == wrong[:8] and wrong[8:] == (right[9] * 2 if right[8] == "0" else "0" + right[8])
    assert 0.4 < sum(unpaired.train["label"]) / len(unpaired.train) < 0.6


def test_the_policy_s_wrong_answers_become_the_rejected_ones():
    """preference.policy_rejected: an answer scoring below the chosen one replaces the row's rejected answer, in the
    row's own form (text or an assistant turn); a right answer, and rows past max_prompts, keep theirs."""
    import datasets

    from pipeline_config.stages import PolicyRejectedConfig
    from qlora.policy_pairs import pairs_with_policy_rejected

    wrong_date = ANSWER.replace("2024-08-29", "2024-08-22")

    def turn(role: str, content: str) -> list[dict]:
        return [{"role": role, "content": content}]

    rows = datasets.Dataset.from_list(
        [
            {"prompt": turn("user", q), "chosen": CHAT_ANSWER, "rejected": turn("assistant", r)}
            for q, r in ("ax", "by", "cz")
        ]
    )
    answers = [wrong_date, " " + ANSWER]  # the third row is past max_prompts: not answered
    pairs, mistakes = pairs_with_policy_rejected(rows, answers, PolicyRejectedConfig())
    assert mistakes == 1
    assert [r["rejected"] for r in pairs] == [
        turn("assistant", wrong_date),
        turn("assistant", "y"),
        turn("assistant", "z"),
    ]
    assert pairs["chosen"] == rows["chosen"]
    # field_match: a right date with a wrong quantity is still short of the chosen answer's 1.0; plain-text rows
    text_rows = datasets.Dataset.from_list([{"prompt": "a", "chosen": ANSWER, "rejected": "x"}])
    by_field = PolicyRejectedConfig(reward=RewardConfig(function="field_match"))
    short = ANSWER.replace('"quantity":5', '"quantity":6')
    assert pairs_with_policy_rejected(text_rows, [short], by_field)[0]["rejected"] == [short]


def test_a_policy_rejected_reward_that_cannot_be_imported_is_named(tmp_path):
    from qlora.data import load_dataset_splits
    from qlora.stages import stage_input_problems

    path = _write_rows(tmp_path / "pref.jsonl", order_stage_rows(20, 1, "preference"))
    cfg = load_pipeline_config(
        _config(
            tmp_path,
            data={"source": path},
            training={"method": "dpo"},
            preference={"policy_rejected": {"reward": {"function": "no_such_module:score"}}},
        )
    )
    problems = stage_input_problems(cfg, load_dataset_splits(cfg.data))
    assert len(problems) == 1 and problems[0].startswith("preference.policy_rejected.reward: cannot import module")


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------------- reference


@pytest.mark.slow
def test_dpo_reference_is_the_starting_adapter(tiny_llama_dir, tmp_path):
    """With a learning rate of 0, DPO's rewards and margins are exactly 0 only if the reference is the adapter the
    stage starts from (a trained, non-zero one here: against the bare base they would not be), and the adapter is
    unchanged."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file

    from pipeline_config.schema import PipelineConfig
    from qlora.data import load_dataset_splits
    from qlora.evaluate import evaluate_base_and_finetuned, evaluate_model
    from qlora.model import build_lora_config, load_quantized_model
    from qlora.model_source import resolve_model_source
    from qlora.stages import StartingAdapter
    from qlora.tokenizer import setup_tokenizer
    from qlora.train import Stage, save_trained_adapter, train_adapter
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    raw["data"] = {"source": _write_rows(tmp_path / "pref.jsonl", order_stage_rows(24, 1, "preference"))}
    raw["training"] |= {"method": "dpo", "max_steps": 2, "logging_steps": 1}
    cfg = PipelineConfig(**raw)
    training = cfg.training.model_copy(update={"learning_rate": 0.0})  # the config refuses 0: a run would not learn
    source = resolve_model_source(cfg.model)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, needs_chat_template=False)
    data = load_dataset_splits(cfg.data)

    # a starting adapter that moves the model: lora_B random, not peft's zeros; bf16 values, as SFT trains them
    base = load_quantized_model(source, cfg.quantization, "cpu")
    start = get_peft_model(base, build_lora_config(cfg.lora, base))
    torch.manual_seed(0)
    for name, param in start.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16).float()
    start.save_pretrained(tmp_path / "start")
    before = load_file(tmp_path / "start" / "adapter_model.safetensors")
    base = start.unload()

    result = train_adapter(
        base, data, tokenizer, cfg.lora, training, "cpu",
        stage=Stage(cfg, StartingAdapter(path=str(tmp_path / "start"), spec=str(tmp_path / "start"))),
    )  # fmt: skip
    assert result.metrics["train_steps"] == 2
    assert result.metrics["stage/rewards/margins"] == 0.0
    assert result.metrics["stage/rewards/chosen"] == 0.0
    # the evaluation's "before" is the starting adapter (kept as "ref"), not the bare base
    comparison = evaluate_base_and_finetuned(result.model, tokenizer, data, cfg.evaluation, 160)
    assert comparison.base.metrics["eval_loss"] == comparison.finetuned.metrics["eval_loss"]
    with result.model.disable_adapter():
        bare = evaluate_model(result.model, tokenizer, data, cfg.evaluation, 160)
    assert abs(bare.metrics["eval_loss"] - comparison.base.metrics["eval_loss"]) > 0.01
    save_trained_adapter(result, tmp_path / "after")  # the trained adapter alone, without the "ref" copy
    assert sorted(p.name for p in (tmp_path / "after").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    after = load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert torch.equal(tensor.float(), after[key].float()), key


# ---------------------------------------------------------------------------------------------------- the flow


@pytest.fixture(scope="module")
def sft_champion(tiny_llama_dir, tmp_path_factory):
    from tests.conftest import train_tiny_champion

    tmp_path = tmp_path_factory.mktemp("sft")
    summary, raw = train_tiny_champion(tiny_llama_dir, tmp_path, "orders-sft")
    return summary, raw, tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto", "grpo"])
def test_a_stage_trains_from_the_registered_sft_champion(sft_champion, method, tmp_path):
    import mlflow

    from flows.finetune import finetune
    from qlora.inference import load_for_inference

    summary, raw, sft_dir = sft_champion
    kind = {"dpo": "preference", "kto": "unpaired_preference", "grpo": "prompt_only"}[method]
    raw = json.loads(json.dumps(raw))
    raw["model"]["adapter"] = "models:/orders-sft@champion"
    raw["data"] = {"source": _write_rows(tmp_path / f"{kind}.jsonl", order_stage_rows(32, 2, kind))}
    if method == "grpo":
        raw["data"]["format"] = "prompt_only"
        raw["grpo"] = {"num_generations": 2, "max_completion_length": 8}
    if method == "dpo":  # the starting adapter's own wrong answers become the rejected ones
        raw["preference"] = {"policy_rejected": {"max_prompts": 12, "max_new_tokens": 8, "batch_size": 6}}
    raw["training"] |= {"method": method, "max_steps": 2, "output_dir": str(tmp_path / "out"), "logging_steps": 1}
    raw["registry"] = {"model_name": f"orders-{method}", "max_new_tokens": 8}
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump(raw))
    stage = finetune(config_path=str(config))

    assert stage["train"]["train_steps"] == 2
    client = mlflow.MlflowClient()
    run = client.get_run(stage["mlflow_run_id"])
    assert run.data.tags["qlora.stage"] == method
    assert run.data.tags["parent_model"] == "orders-sft"
    assert run.data.tags["parent_version"] == summary["registry"]["version"]
    assert run.data.tags["parent_run_id"] == summary["mlflow_run_id"]
    expected_metric = {"dpo": "rewards/margins", "kto": "kl", "grpo": "rewards/field_match/mean"}
    history = client.get_metric_history(run.info.run_id, expected_metric[method])
    assert history, f"{expected_metric[method]} not in MLflow: {sorted(run.data.metrics)}"
    version = client.get_model_version(f"orders-{method}", stage["registry"]["version"])
    assert version.tags["parent_version"] == summary["registry"]["version"]
    assert version.tags["qlora.stage"] == method
    if method == "dpo":  # 12 answers of the starting policy, kept in the run folder and logged with the run
        answers = Path(stage["run_dir"]) / "policy-answers.jsonl"
        assert [json.loads(line)["row"] for line in answers.read_text().splitlines()] == list(range(12))
        assert run.data.metrics["stage/policy_answered"] == 12
        # a tiny model's 8 tokens are never the whole order: every answer is a mistake, now a rejected answer
        assert run.data.metrics["stage/policy_mistakes"] == 12
        assert [a.path for a in client.list_artifacts(run.info.run_id, "stage")] == ["stage/policy-answers.jsonl"]
    loaded = load_for_inference(f"models:/orders-{method}/{stage['registry']['version']}")
    assert list(loaded.model.peft_config) == ["default"]  # the registered adapter is the trained one alone


def test_a_starting_adapter_that_cannot_be_used_is_named(tmp_path):
    """model.adapter: no such registered model (in the run's own tracking store), no adapter in the folder, or an
    adapter of another base: one error naming the field, before any weights load."""
    from pipeline_config.loading import dump_pipeline_config
    from pipeline_config.schema import PipelineConfig
    from qlora.save import RESOLVED_CONFIG_NAME
    from qlora.stages import resolve_starting_adapter

    def cfg(adapter: str) -> PipelineConfig:
        raw = _config(tmp_path, model={"adapter": adapter}, tracking={"tracking_uri": f"sqlite:///{tmp_path}/m.db"})
        return load_pipeline_config(raw)

    with pytest.raises(PipelineInputError, match=r"model.adapter models:/nobody@champion: .*m.db"):
        resolve_starting_adapter(cfg("models:/nobody@champion"))
    with pytest.raises(PipelineInputError, match=r"model.adapter .* does not exist"):
        resolve_starting_adapter(cfg(str(tmp_path / "missing")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text("{}")
    (other / RESOLVED_CONFIG_NAME).write_text(
        dump_pipeline_config(load_pipeline_config(_config(tmp_path, model={"name_or_path": "elsewhere"})))
    )
    with pytest.raises(PipelineInputError, match=r"was trained on elsewhere, not on this run's model.name_or_path x"):
        resolve_starting_adapter(cfg(str(other)))


def test_a_stage_worse_than_its_starting_adapter_is_not_promoted(tmp_path):
    """The champion rule for a stage from an adapter: it must also beat that adapter's metric as the run measured it
    (the "before" column), even as the first version of its registered name. Found by running make demo-align: a
    DPO stage that took the SFT champion's exact match from 90 % to 0 % was promoted ("no champion yet")."""
    import mlflow

    from qlora.registry import decide_champion, starting_metric
    from qlora.stages import StartingAdapter

    cfg = load_pipeline_config(_config(tmp_path, training={"method": "dpo"}, model={"adapter": "models:/sft@champion"}))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    client.create_registered_model("stage")
    for _ in range(2):
        client.create_model_version("stage", source=str(tmp_path))
    starting = StartingAdapter(path=str(tmp_path), spec="models:/sft@champion", model_name="sft", version="3")
    metrics = {"base_exact_match": 90.0, "finetuned_exact_match": 0.0}
    assert starting_metric(cfg, metrics, None) is None  # a run from the bare base: the usual rule only
    worse = decide_champion(client, "stage", "1", 0.0, "d", cfg, None, starting_metric(cfg, metrics, starting))
    assert not worse.became_champion
    assert "does not beat the starting adapter's 90.0000" in worse.reason
    better = decide_champion(client, "stage", "2", 95.0, "d", cfg, None, 90.0)
    assert better.became_champion and str(client.get_model_version_by_alias("stage", "champion").version) == "2"
