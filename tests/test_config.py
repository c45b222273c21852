"""The typed config: every shipped YAML validates, errors are collected and readable, recipe values are exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.cli import main
from pipeline_config import CONFIG_DIR, ConfigError, load_pipeline_config
from qlora.train import build_sft_config

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {p.name for p in SHIPPED} >= {"default.yaml", "llama2-7b-chat-guanaco.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yaml_validates_and_opens_with_its_command(path: Path):
    cfg = load_pipeline_config(path)
    assert cfg.model.name_or_path
    first_lines = path.read_text().splitlines()[:3]
    assert any("qlora-flow run --config pipeline_config/" + path.name in line for line in first_lines)


def test_llama2_recipe_values_are_the_original_ones():
    cfg = load_pipeline_config(CONFIG_DIR / "llama2-7b-chat-guanaco.yaml")
    assert cfg.model.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    assert cfg.data.source == "mlabonne/guanaco-llama2-1k" and cfg.data.format == "text"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    q = cfg.quantization
    assert (q.quant_type, q.compute_dtype, q.double_quant) == ("nf4", "float16", False)
    t = cfg.training
    assert (t.num_train_epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (1, 4, 1)
    assert t.gradient_checkpointing and t.group_by_length and not t.fp16 and not t.bf16
    assert (t.max_grad_norm, t.learning_rate, t.weight_decay) == (0.3, 2e-4, 0.001)
    assert (t.optim, t.lr_scheduler_type, t.warmup_ratio, t.logging_steps) == ("paged_adamw_32bit", "cosine", 0.03, 25)


def test_recipe_names_map_onto_installed_transformers(tmp_path):
    cfg = load_pipeline_config(CONFIG_DIR / "llama2-7b-chat-guanaco.yaml", [f"training.output_dir={tmp_path}"])
    args = build_sft_config(cfg.training, device="cpu", report_to_mlflow=False, output_dir=str(tmp_path / "run"))
    assert args.output_dir == str(tmp_path / "run")
    assert args.warmup_steps == 0.03  # transformers 5: a fraction below 1 replaces warmup_ratio
    assert args.train_sampling_strategy == "group_by_length"
    assert args.max_length == 1024 and args.optim == "paged_adamw_32bit" and args.max_grad_norm == 0.3


def _write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base() -> dict:
    return yaml.safe_load((CONFIG_DIR / "default.yaml").read_text())


def test_all_errors_reported_together_with_suggestion(tmp_path):
    data = _base()
    data["training"]["learning_rte"] = 1e-3
    data["lora"]["r"] = 0
    data["lora"]["dropout"] = 1.5
    data["training"]["per_device_train_batch_size"] = "eight"
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(_write(tmp_path, data))
    msg = str(err.value)
    assert len(err.value.problems) == 4
    assert "training.learning_rte: unknown key (did you mean 'training.learning_rate'?)" in msg
    assert "lora.r:" in msg and "lora.dropout:" in msg and "training.per_device_train_batch_size:" in msg


def test_cross_field_checks(tmp_path):
    data = _base()
    data["training"].update(bf16=True, fp16=True)
    with pytest.raises(ConfigError, match="both true"):
        load_pipeline_config(_write(tmp_path, data))
    data = _base()
    data["training"].update(fp16=True)
    data["quantization"]["compute_dtype"] = "bfloat16"
    with pytest.raises(ConfigError, match="use one dtype"):
        load_pipeline_config(_write(tmp_path, data))


def test_overrides_are_typed_and_validated():
    cfg = load_pipeline_config(None, ["training.max_steps=3", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.training.max_steps == 3 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="training.learning_rate"):
        load_pipeline_config(None, ["training.learning_rate=-1"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name_or_path: x\n  bad: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_pipeline_config(p)


def test_cli_exit_code_2_and_one_message(tmp_path, capsys):
    data = _base()
    data["trainig"] = {}
    code = main(["validate", "--config", str(_write(tmp_path, data))])
    err = capsys.readouterr().err
    assert code == 2
    assert "did you mean 'training'" in err and "Traceback" not in err


def test_cli_validate_default_reports_data(capsys):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "format=messages train=1200 eval=240" in out


def test_module_entry_point_rejects_bad_config_with_exit_2(tmp_path):
    import subprocess
    import sys

    data = _base()
    data["lora"]["alpha"] = -1
    result = subprocess.run(
        [sys.executable, "-m", "flows.finetune", "--config", str(_write(tmp_path, data))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "lora.alpha" in result.stderr and "Traceback" not in result.stderr


def test_overrides_are_typed_against_the_schema(tiny_config_file):
    """A string field takes the text as it is; other fields read it as YAML."""
    cfg = load_pipeline_config(
        tiny_config_file,
        [
            "data.response_template=[/INST]",  # YAML would make this a list
            "model.revision=123",  # and this an int
            "lora.target_modules=[q_proj, v_proj]",
            "training.max_steps=3",
            "training.liger_kernels=auto",
            "training.bf16=false",
        ],
    )
    assert cfg.data.response_template == "[/INST]" and cfg.model.revision == "123"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.training.max_steps == 3
    assert cfg.training.liger_kernels == "auto" and cfg.training.bf16 is False


def test_config_loads_from_a_mapping_with_typed_overrides(tiny_llama_dir, tmp_path):
    from pipeline_config.loading import ConfigError
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    cfg = load_pipeline_config(raw, {"training.max_steps": 4, "data.source": "/data/new file.jsonl"})
    assert cfg.training.max_steps == 4 and cfg.data.source == "/data/new file.jsonl"
    assert raw["training"]["max_steps"] == 6  # the caller's mapping is not modified
    assert load_pipeline_config(cfg.model_dump(mode="json")) == cfg  # a config round-trips as data
    with pytest.raises(ConfigError, match="training.learning_rte: unknown key"):
        load_pipeline_config(raw, {"training.learning_rte": 1e-3})


# Shipped configs of current hub models: (model family, chat template family of tests/test_chat_templates.py)
HUB_MODEL_CONFIGS = {
    "llama-3.1-8b-instruct.yaml": ("llama", "llama3_1"),
    "qwen3-8b.yaml": ("qwen3", "qwen3"),
    "mistral-7b-instruct.yaml": ("mistral", "mistral"),
    "gemma-3-1b-it.yaml": ("gemma3_text", "gemma3"),
    "qwen3-30b-a3b.yaml": ("qwen3_moe", "qwen3"),
}


@pytest.mark.parametrize("name", sorted(HUB_MODEL_CONFIGS))
def test_hub_model_config_passes_validate_on_a_local_stand_in(name, smol_tokenizer_dir, tmp_path):
    """Each shipped config of a current model, pointed at a stand-in of its family (its config.json with tiny widths,
    no weights; the SmolLM2 tokenizer with the model's real chat template): the checks `validate` runs before any
    weights load pass, the family is the one the config was written for, and the loss is on the assistant turns."""
    from transformers import AutoConfig

    from qlora.chat_template import decide_assistant_only_loss
    from qlora.model_source import resolve_model_source
    from qlora.preflight import PreflightReport, family_check, lora_target_problems, sequence_length_problem
    from qlora.tokenizer import setup_tokenizer
    from tests.test_chat_templates import family_tokenizer
    from tests.test_families import FAMILIES

    family, template_family = HUB_MODEL_CONFIGS[name]
    stand_in = tmp_path / "stand-in"
    widths = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    AutoConfig.for_model(
        family, **widths, num_key_value_heads=2, vocab_size=49216, max_position_embeddings=4096, **FAMILIES[family]
    ).save_pretrained(stand_in)
    family_tokenizer(smol_tokenizer_dir, template_family).save_pretrained(stand_in)

    cfg = load_pipeline_config(CONFIG_DIR / name, [f"model.name_or_path={stand_in}"])
    assert cfg.data.format == "messages" and cfg.training.device == "cuda"
    source = resolve_model_source(cfg.model)
    assert lora_target_problems(cfg, source) == [] and sequence_length_problem(cfg, source) is None
    report = PreflightReport()
    family_check(cfg, source, "cuda", report)
    assert report.fatal == [] and report.warnings == []
    assert report.family.startswith(f"family: {family} (")
    tokenizer = setup_tokenizer(source, cfg.tokenizer, needs_chat_template=True)
    decision = decide_assistant_only_loss(cfg.training.assistant_only_loss, "messages", tokenizer)
    assert decision.assistant_only_loss, decision.reason
