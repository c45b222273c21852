"""Every bad input gets one short message naming what to fix, exit code 2, no traceback, and leaves nothing behind:
no MLflow run (so nothing RUNNING, nothing registered) and no adapter folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tests.conftest import tiny_config_dict


def _unknown_key(c, tmp):
    c["training"]["learning_rte"] = 1e-3


def _wrong_type(c, tmp):
    c["training"]["per_device_train_batch_size"] = "eight"


def _set(section, key, value):
    def apply(c, tmp):
        c[section][key] = value

    return apply


def _jsonl(tmp: Path, name: str, lines: list[str]) -> str:
    path = tmp / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _missing_file(c, tmp):
    c["data"] = {"source": str(tmp / "missing.jsonl")}


def _malformed_jsonl(c, tmp):
    c["data"] = {"source": _jsonl(tmp, "bad.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": "c",}'])}


def _missing_column(c, tmp):
    rows = [json.dumps({"question": "q", "reply": "a"})] * 6
    c["data"] = {"source": _jsonl(tmp, "cols.jsonl", rows), "format": "prompt_completion"}


def _empty_dataset(c, tmp):
    c["data"] = {"source": _jsonl(tmp, "empty.jsonl", [])}


def _empty_split(c, tmp):
    import pandas as pd

    rows = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(6)]
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "completion": pd.Series([], dtype=str)}).to_parquet(
        tmp / "eval.parquet"
    )
    c["data"] = {"source": _jsonl(tmp, "train.jsonl", rows), "eval_source": str(tmp / "eval.parquet")}


def _random_bytes(tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_bytes(random.Random(0).randbytes(4096))  # seeded: the same "binary file" every run
    return str(path)


def _parquet_of_random_bytes(c, tmp):
    c["data"] = {"source": _random_bytes(tmp, "noise.parquet")}


def _text_named_parquet(c, tmp):
    c["data"] = {"source": _jsonl(tmp, "rows.parquet", [json.dumps({"text": f"row {i}"}) for i in range(6)])}


def _jsonl_of_random_bytes(c, tmp):
    c["data"] = {"source": _random_bytes(tmp, "noise.jsonl")}


def _csv_not_utf8(c, tmp):
    path = tmp / "latin1.csv"
    path.write_bytes("text\ncaf\u00e9 au lait\n".encode("latin-1"))
    c["data"] = {"source": str(path)}


def _json_of_random_bytes(c, tmp):
    c["data"] = {"source": _random_bytes(tmp, "noise.json")}


def _all_rows_too_long(c, tmp):
    c["training"]["max_seq_length"] = 8


def _model_path_missing(c, tmp):
    c["model"] = {"name_or_path": str(tmp / "no-such-model")}


def _hub_without_network(c, tmp):
    c["model"] = {"name_or_path": "NousResearch/Llama-2-7b-chat-hf"}


def _cuda_only_on_cpu(c, tmp):
    c["training"].update(optim="paged_adamw_32bit", device="auto")


def _output_not_writable(c, tmp):
    blocker = tmp / "a-file"
    blocker.write_text("x")
    c["training"]["output_dir"] = str(blocker / "out")


def _same_file_for_eval(c, tmp):
    rows = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(8)]
    c["data"] = {"source": _jsonl(tmp, "train.jsonl", rows), "eval_source": _jsonl(tmp, "copy.jsonl", rows)}


def _rows(field: str, bad, fmt: str = "text"):
    def apply(c, tmp):
        good = {"text": {"text": "a row"}, "prompt_completion": {"prompt": "q", "completion": "a"}}[fmt]
        rows = [json.dumps(good)] * 4 + [json.dumps({**good, field: bad})] + [json.dumps(good)] * 3
        c["data"] = {"source": _jsonl(tmp, "rows.jsonl", rows), "format": fmt}
        if fmt == "text":  # plain text has no answer to score
            c["evaluation"]["task_metric"] = "none"

    return apply


def _chat_content(bad):
    def apply(c, tmp):
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        bad_turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": bad}]
        rows = [json.dumps({"messages": turns})] * 2 + [json.dumps({"messages": bad_turns})]
        c["data"] = {"source": _jsonl(tmp, "chat.jsonl", rows)}

    return apply


def _tracking_server_down(c, tmp):
    from tests.conftest import free_port

    c["tracking"]["tracking_uri"] = f"http://127.0.0.1:{free_port()}"


CASES = {
    "unknown key": (_unknown_key, "did you mean 'training.learning_rate'"),
    "wrong type": (_wrong_type, "training.per_device_train_batch_size"),
    "lr <= 0": (_set("training", "learning_rate", 0), "training.learning_rate"),
    "r <= 0": (_set("lora", "r", 0), "lora.r"),
    "dropout outside [0,1)": (_set("lora", "dropout", 1.0), "lora.dropout"),
    "warmup outside [0,1)": (_set("training", "warmup_ratio", 1.5), "training.warmup_ratio"),
    "fp16 and bf16": (lambda c, t: c["training"].update(fp16=True, bf16=True), "both true: choose one"),
    "8-bit and 4-bit": (_set("quantization", "load_in_8bit", True), "load_in_8bit and load_in_4bit"),
    "wrapped packing with completion-only": (
        lambda c, t: c["training"].update(packing=True, packing_strategy="wrapped", completion_only_loss=True),
        "completion_only_loss cannot be kept",
    ),
    "missing data file": (_missing_file, "missing.jsonl not found"),
    "malformed jsonl": (_malformed_jsonl, "line 3 is not valid JSON"),
    "missing column": (_missing_column, "available columns: question, reply"),
    "empty dataset": (_empty_dataset, "empty.jsonl has no rows: the training split is empty"),
    "empty split": (_empty_split, "eval.parquet has no rows: the held-out split is empty"),
    "parquet of random bytes": (_parquet_of_random_bytes, "noise.parquet is not a valid Parquet file"),
    "text file named .parquet": (_text_named_parquet, "rows.parquet is not a valid Parquet file"),
    "jsonl of random bytes": (_jsonl_of_random_bytes, "noise.jsonl is not UTF-8 text (byte 0x"),
    "json of random bytes": (_json_of_random_bytes, "noise.json is not UTF-8 text (byte 0x"),
    "csv not utf-8": (_csv_not_utf8, "latin1.csv is not UTF-8 text (byte 0xe9 at offset 8)"),
    "every row too long": (_all_rows_too_long, "every training row is longer than training.max_seq_length 8"),
    "model path missing": (_model_path_missing, "folder not found"),
    "hub id without network": (_hub_without_network, "hub cannot be reached"),
    "cuda-only option on cpu": (_cuda_only_on_cpu, "needs CUDA, and this run is on the CPU"),
    "output folder not writable": (_output_not_writable, "is not writable"),
    "machine rank not below num_machines": (
        lambda c, t: c.update(distributed={"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"}),
        "distributed.machine_rank 2 must be below num_machines 2",
    ),
    "several machines without a meeting point": (
        lambda c, t: c.update(distributed={"num_machines": 2}),
        "distributed.num_machines > 1 needs main_process_ip or rdzv_endpoint",
    ),
    "fsdp with 4-bit weights stored as uint8": (
        lambda c, t: c.update(distributed={"num_processes": 2, "strategy": "fsdp"}),
        "set quant_storage_dtype: float32",
    ),
    "fsdp without mixed precision": (
        lambda c, t: (
            c.update(distributed={"num_processes": 2, "strategy": "fsdp"}),
            c["quantization"].update(quant_storage_dtype="float32"),
        ),
        "set training.bf16: true",
    ),
    "fsdp on the cpu": (
        lambda c, t: (
            c.update(distributed={"num_processes": 2, "strategy": "fsdp"}),
            c["quantization"].update(compute_dtype="bfloat16", quant_storage_dtype="bfloat16"),
            c["training"].update(device="auto", bf16=True),
        ),
        "distributed.strategy 'fsdp' needs CUDA GPUs",
    ),
    "lora target that names no module": (
        _set("lora", "target_modules", ["q_proj", "not_a_module"]),
        "lora.target_modules: 'not_a_module' matches no module of LlamaForCausalLM",
    ),
    # settings that used to pass validation and fail late (after the weights loaded, or after training)
    "registered-model name MLflow refuses": (
        lambda c, t: c.update(registry={"model_name": "team/orders:v1"}),
        "registry.model_name 'team/orders:v1': Invalid model name 'team/orders:v1'. Names cannot contain '/' or ':'",
    ),
    "unknown optimizer": (_set("training", "optim", "adamw_torc"), "training.optim 'adamw_torc' is not an optimizer"),
    "unknown scheduler": (
        _set("training", "lr_scheduler_type", "cosin"),
        "training.lr_scheduler_type 'cosin' is not a scheduler transformers knows: did you mean 'cosine'?",
    ),
    "max_steps 0": (_set("training", "max_steps", 0), "training.max_steps is 0, which trains nothing"),
    "learning rate 1e9": (_set("training", "learning_rate", 1e9), "training.learning_rate: Input should be less"),
    "learning rate inf": (_set("training", "learning_rate", float("inf")), "training.learning_rate: Input should be"),
    "no lora targets": (_set("lora", "target_modules", []), "lora.target_modules is empty"),
    "sequence length beyond the model's": (
        _set("training", "max_seq_length", 100_000),
        "training.max_seq_length 100000 is beyond the 512 positions Llama was built for",
    ),
    "eval file identical to the training file": (_same_file_for_eval, "holds the same rows as data.source"),
    "chat template file missing": (
        lambda c, t: c.update(tokenizer={"chat_template_file": str(t / "none.jinja")}),
        "tokenizer.chat_template_file",
    ),
    "empty experiment name": (_set("tracking", "experiment_name", ""), "tracking.experiment_name"),
    "tracking URI of an unknown scheme": (
        _set("tracking", "tracking_uri", "mlfow://host/x"),
        "MLflow has no tracking store for this scheme",
    ),
    "tracking server down": (_tracking_server_down, "does not answer"),
    "null text": (_rows("text", None), "rows.jsonl: row 5, column 'text' (data.columns.text) is null, not text"),
    "number as completion": (
        _rows("completion", 42, "prompt_completion"),
        "row 5, column 'completion' (data.columns.completion) is a number",
    ),
    "list as text": (_rows("text", ["a", "b"]), "row 5, column 'text' (data.columns.text) is a list"),
    "null chat content": (_chat_content(None), "chat.jsonl: row 3, turn 2 (assistant): content is null"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_message(case, tiny_llama_dir, tmp_path, capsys):
    mutate, expected = CASES[case]
    config = tiny_config_dict(tiny_llama_dir, tmp_path)
    mutate(config, tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))

    code = main(["run", "--config", str(path)])

    err = capsys.readouterr().err
    assert code == 2
    # Before the message, the flow's own log may show which step refused the input (config errors come before
    # the flow starts); the message itself is short, and nothing anywhere prints a traceback.
    message = err[err.rindex("error: ") :]
    assert expected in message
    assert "Traceback" not in err and len(message.splitlines()) <= 8
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was opened, so none is RUNNING or registered
    assert not list((tmp_path / "out").rglob("adapter"))  # in no run folder either


def _config_of_random_bytes(tmp: Path) -> Path:
    return Path(_random_bytes(tmp, "noise.yaml"))


def _config_is_a_folder(tmp: Path) -> Path:
    (tmp / "configs").mkdir()
    return tmp / "configs"


def _config_with_nul(tmp: Path) -> Path:
    path = tmp / "nul.yaml"
    path.write_bytes(b"model:\x00\n")  # valid UTF-8, but YAML forbids control characters
    return path


CONFIG_FILE_CASES = {
    "random bytes": (_config_of_random_bytes, "noise.yaml is not UTF-8 text (byte 0x"),
    "a folder": (_config_is_a_folder, "configs is a folder: pass the path of a YAML config file"),
    "control character": (_config_with_nul, "nul.yaml is not YAML text (character #x0000"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(CONFIG_FILE_CASES))
def test_unreadable_config_file_exits_2_with_one_message(case, command, tmp_path, capsys):
    make, expected = CONFIG_FILE_CASES[case]

    code = main([command, "--config", str(make(tmp_path))])

    err = capsys.readouterr().err
    assert code == 2
    assert any(expected in line for line in err.splitlines())  # the file and what is wrong, on one line
    assert "Traceback" not in err and len(err.splitlines()) <= 8
    assert not (tmp_path / "mlflow.db").exists()


def test_gated_model_without_token(monkeypatch, tmp_path):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    from pipeline_config.schema import ModelConfig
    from qlora.errors import ModelSourceError
    from qlora.model_source import check_model_source

    def gated(*args, **kwargs):
        request = httpx2.Request("GET", "https://huggingface.co/api/models/meta-llama/Llama-2-7b-chat-hf")
        raise GatedRepoError("gated", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub, "model_info", gated)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ModelSourceError, match=r"is gated and the token in \$HF_TOKEN is not set"):
        check_model_source(ModelConfig(name_or_path="meta-llama/Llama-2-7b-chat-hf"))


def test_debug_flag_shows_traceback(tiny_llama_dir, tmp_path, capsys):
    config = tiny_config_dict(tiny_llama_dir, tmp_path)
    _missing_file(config, tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", "--config", str(path), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


# --- sweep spaces: `qlora-flow sweep --space FILE` ----------------------------------------------------------------

GOOD_SPACE = {"parameters": {"training.learning_rate": [1e-3, 3e-3]}, "metric": "finetuned_eval_loss"}


def _space(**changes) -> dict:
    return {**GOOD_SPACE, **changes}


SPACE_CASES = {
    "unknown config key": (
        _space(parameters={"training.learning_rte": [1e-3, 3e-3]}),
        "line 2, parameters.training.learning_rte: unknown config setting (did you mean 'training.learning_rate'?)",
    ),
    "bad distribution syntax": (
        _space(parameters={"training.learning_rate": "logunifrom(1e-5, 1e-3)"}, method="random", n_trials=2),
        "parameters.training.learning_rate: 'logunifrom(1e-5, 1e-3)' is not a distribution: write a list of values, "
        "uniform(low, high)",
    ),
    "distribution with one bound": (
        _space(parameters={"training.learning_rate": "loguniform(1e-5)"}, method="random", n_trials=2),
        "loguniform takes two numbers, loguniform(low, high)",
    ),
    "log range from zero": (
        _space(parameters={"training.learning_rate": "loguniform(0, 1e-3)"}, method="random", n_trials=2),
        "a log scale needs low > 0",
    ),
    "n_trials below 1": (_space(n_trials=0), "n_trials: Input should be greater than or equal to 1 (got 0)"),
    "grid larger than n_trials": (
        _space(parameters={"lora.r": [4, 8, 16], "training.learning_rate": [1e-3, 3e-3]}, n_trials=4),
        "n_trials: the grid has 6 combinations, larger than n_trials 4: drop n_trials",
    ),
    "range in a grid": (
        _space(parameters={"training.learning_rate": "loguniform(1e-5, 1e-3)"}),
        "loguniform(1e-05, 0.001) is a range, and method grid needs a list of values",
    ),
    "random without n_trials": (_space(method="random"), "n_trials: required for method random"),
    "value that makes an invalid config": (
        _space(parameters={"lora.r": [0, 8]}),
        "parameters.lora.r: value 0 makes an invalid config: lora.r: Input should be greater than 0",
    ),
    "combination that makes an invalid config": (
        _space(parameters={"training.bf16": [False, True], "quantization.compute_dtype": ["float32", "float16"]}),
        "the combination {'training.bf16': True, 'quantization.compute_dtype': 'float16'} makes an invalid config: "
        "training.bf16 is true but quantization.compute_dtype is float16",
    ),
    "setting that is not a hyperparameter": (
        _space(parameters={"data.source": ["bundled:orders", "other.jsonl"]}),
        "parameters.data.source: not a setting a sweep varies",
    ),
    "single value instead of a search": (
        _space(parameters={"lora.r": 8}),
        "parameters.lora.r: 8 is one value, not a search: put it under overrides:",
    ),
    "unknown top-level key": (_space(n_trails=4), "line 6, n_trails: unknown key (did you mean 'n_trials'?)"),
    "pruning on a metric that rises": (
        _space(metric="finetuned_exact_match", pruning={"pruner": "median"}),
        "pruning.pruner: median compares the eval loss trials report while they train",
    ),
    "unknown metric": (_space(metric="accuracy"), "metric: 'accuracy' is not a metric every trial logs"),
    "bad override": (
        _space(overrides={"training.max_step": 4}),
        "line 7, overrides.training.max_step: unknown key (did you mean 'training.max_steps'?)",
    ),
}


def _run_sweep(tiny_llama_dir, tmp_path, space_text: str, capsys) -> tuple[int, str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_llama_dir, tmp_path)))
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    code = main(["sweep", "--config", str(config), "--space", str(space)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(SPACE_CASES))
def test_bad_sweep_space_exits_2_naming_file_field_and_line(case, tiny_llama_dir, tmp_path, capsys):
    space, expected = SPACE_CASES[case]
    code, err = _run_sweep(tiny_llama_dir, tmp_path, yaml.safe_dump(space, sort_keys=False), capsys)

    assert code == 2
    message = err[err.rindex("error: ") :]
    assert f"invalid sweep space in {tmp_path / 'space.yaml'}" in message and expected in message
    assert "Traceback" not in err and len(message.splitlines()) <= 8
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()  # nothing written


def test_sweep_space_yaml_error_and_missing_file_exit_2(tiny_llama_dir, tmp_path, capsys):
    code, err = _run_sweep(tiny_llama_dir, tmp_path, "parameters:\n  lora.r: [4, 8\n", capsys)
    assert code == 2 and "line 3, column 1: YAML syntax error" in err
    config = tmp_path / "tiny.yaml"
    assert main(["sweep", "--config", str(config), "--space", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml not found" in capsys.readouterr().err


def test_sweep_stops_at_preflight_before_weights_or_records(tiny_llama_dir, tmp_path, capsys):
    """A space whose trials' data cannot train (every row longer than max_seq_length) passes the schema, and the
    sweep's preflight stops it: exit 2, no MLflow run, no sweep folder, nothing registered."""
    space = yaml.safe_dump(_space(overrides={"training.max_seq_length": 8}))
    code, err = _run_sweep(tiny_llama_dir, tmp_path, space, capsys)
    assert code == 2 and "every training row is longer than training.max_seq_length 8" in err
    assert "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out" / "sweeps").exists()
