"""Crash safety: SIGKILL the flow after its second checkpoint. A re-run with other data starts fresh in a new run
folder and says why; a re-run with the same fingerprint resumes the killed folder (not from step 0) to the same
adapter as an uninterrupted run; the killed attempt's MLflow run ends KILLED and the new one links to it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flows.cli import main
from flows.finetune import finetune
from tests.conftest import start_in_own_session, stop_process_group, tiny_config_dict

REPO = Path(__file__).resolve().parent.parent


def _config(tiny_llama_dir, tmp_path, out_name: str) -> Path:
    cfg = tiny_config_dict(tiny_llama_dir, tmp_path)
    cfg["training"].update(
        output_dir=str(tmp_path / out_name), max_steps=24, save_steps=2, save_total_limit=3, logging_steps=1
    )
    path = tmp_path / f"{out_name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def _run_dir(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if (p / "run.json").is_file()]
    return folder


@pytest.mark.slow
def test_kill_after_second_checkpoint_then_resume(prefect_server, tiny_llama_dir, tmp_path, capsys, straight):
    killed_cfg = _config(tiny_llama_dir, tmp_path, "killed")
    root = tmp_path / "killed"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)  # the child starts its own temporary server
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.finetune", "--config", str(killed_cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(root.glob("*/checkpoint-4")):
            assert proc.poll() is None, "the flow ended before its second checkpoint"
            assert time.monotonic() < deadline, "no second checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    out = _run_dir(root)
    at_kill = _checkpoints(out)
    assert at_kill and 4 <= at_kill[-1] < 24
    for step in at_kill:  # only complete checkpoints exist
        assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
        assert (out / f"checkpoint-{step}" / "optimizer.pt").is_file()
    assert (out / "fingerprint.json").is_file()  # written when training started

    cfg = yaml.safe_load(killed_cfg.read_text())
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    experiment_id = client.get_experiment_by_name(cfg["tracking"]["experiment_name"]).experiment_id
    (killed_run,) = client.search_runs([experiment_id])
    assert killed_run.info.status == "RUNNING"  # SIGKILL gave it no chance to close

    # Other data (fewer rows): the killed run's checkpoints are not this run's, so it starts fresh and says why.
    code = main(
        ["run", "--config", str(killed_cfg), "--set", "data.max_train_rows=48", "--set", "training.max_steps=2"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert f"newest unfinished run {out.name} trained something else (data.max_train_rows: 64 -> 48" in printed
    assert client.get_run(killed_run.info.run_id).info.status == "KILLED"  # its process is gone: closed
    assert _checkpoints(out) == at_kill  # untouched
    # Asked to continue it explicitly with other settings: refused before any weights load, nothing trained.
    code = main(["run", "--config", str(killed_cfg), "--set", "lora.r=16", "--resume", str(out)])
    assert code == 2 and "lora.r: 8 -> 16" in capsys.readouterr().err

    resumed = finetune(config_path=str(killed_cfg))
    assert resumed["run_dir"] == str(out) and f"from checkpoint-{at_kill[-1]}" in resumed["run_dir_reason"]
    run = client.get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_checkpoint"] == f"checkpoint-{at_kill[-1]}"
    assert run.data.tags["continues_run_id"] == killed_run.info.run_id
    assert run.data.metrics["train_steps"] == 24
    first_logged = min(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert first_logged == at_kill[-1] + 1  # no step before the checkpoint was trained again

    _assert_same_adapter(out / "adapter", straight)
    assert straight["finetuned"]["eval_loss"] == pytest.approx(resumed["finetuned"]["eval_loss"], rel=1e-3)
    assert (out / "RUN_FINISHED").is_file()  # never resumed again (test_run_folders.py)


@pytest.fixture(scope="module")
def straight(prefect_server, tiny_llama_dir, tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted-and-resumed one must end on."""
    return finetune(config_path=str(_config(tiny_llama_dir, tmp_path_factory.mktemp("straight"), "straight")))


def _assert_same_adapter(adapter_dir: Path, straight: dict) -> None:
    a = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(Path(straight["adapter_dir"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=1e-5)


def _prefect_flow_runs(prefect_home: Path) -> dict[str, str]:
    """{flow run name: state type}, read from the temporary server's own database (it stopped with the run)."""
    import sqlite3

    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return dict(db.execute("SELECT name, state_type FROM flow_run"))


@pytest.mark.slow
def test_ctrl_c_stops_at_the_next_step_with_a_checkpoint_and_resumes_to_the_same_adapter(
    prefect_server, tiny_llama_dir, tmp_path, straight
):
    """Ctrl-C (SIGINT to the terminal's process group) while training, on a run with its own temporary Prefect
    server: training stops at the next optimizer step and writes a checkpoint of it, the command exits 130 within
    the grace period, the MLflow run is KILLED at that step, the flow run Crashed, the lock free, no child process
    left (the temporary server included); the next run resumes from that checkpoint to the uninterrupted adapter."""
    import psutil

    from qlora.run_folder import RunLock

    config = _config(tiny_llama_dir, tmp_path, "stopped")
    root = tmp_path / "stopped"
    prefect_home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)  # the command starts its own temporary server
    log = tmp_path / "run.log"
    proc = start_in_own_session([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], log, env)
    try:
        deadline = time.monotonic() + 240
        while not list(root.glob("*/checkpoint-4")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no second checkpoint within 240 s"
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(c.cmdline()) for c in children)  # the temporary Prefect server
    finally:
        code, took_s = stop_process_group(proc, signal.SIGINT)  # Ctrl-C
    printed = log.read_text()
    assert code == 130, printed[-3000:]
    assert took_s < 25, f"stopped in {took_s:.1f} s, beyond the grace period"
    match = re.search(r"stopped: stopped by SIGINT at step (\d+) \(checkpoint checkpoint-(\d+) written\)", printed)
    assert match and match.group(1) == match.group(2), printed[-3000:]
    step = int(match.group(1))
    out = _run_dir(root)
    assert 4 <= step < 24 and _checkpoints(out)[-1] == step
    assert (out / f"checkpoint-{step}" / "SHA256SUMS.json").is_file() and not (out / ".checkpoint-staging").exists()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    lock = RunLock(out)
    assert lock.acquire()  # released
    lock.release()
    cfg = yaml.safe_load(config.read_text())
    client = MlflowClient(cfg["tracking"]["tracking_uri"])
    (stopped_run,) = client.search_runs(
        [client.get_experiment_by_name(cfg["tracking"]["experiment_name"]).experiment_id]
    )
    assert stopped_run.info.status == "KILLED"
    assert stopped_run.data.tags["stopped_at_step"] == str(step) and stopped_run.data.tags["stopped_by"] == "SIGINT"
    assert list(_prefect_flow_runs(prefect_home).values()) == ["CRASHED"]

    resumed = finetune(config_path=str(config))
    assert resumed["run_dir"] == str(out) and f"from checkpoint-{step}" in resumed["run_dir_reason"]
    assert Path(resumed["resumed_from"]).name == f"checkpoint-{step}"
    _assert_same_adapter(out / "adapter", straight)


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    from qlora.run_folder import STAGING_DIRNAME
    from qlora.train import latest_complete_checkpoint

    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / STAGING_DIRNAME / "checkpoint-12").mkdir(parents=True)  # a save the kill interrupted
    assert latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert latest_complete_checkpoint(str(tmp_path / "missing")) is None


def test_fingerprint_ignores_neutral_settings(tiny_llama_dir, tmp_path):
    from pipeline_config.schema import PipelineConfig
    from qlora.run_folder import fingerprint_differences, run_fingerprint

    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    first = run_fingerprint(PipelineConfig.model_validate(raw), "d1", "m1")
    raw["training"].update(logging_steps=1, save_steps=3, output_dir=str(tmp_path / "elsewhere"))
    raw["evaluation"]["max_generation_rows"] = 1
    raw["tracking"]["experiment_name"] = "other"
    assert fingerprint_differences(first, run_fingerprint(PipelineConfig.model_validate(raw), "d1", "m1")) == []
    raw["lora"]["r"] = 16
    changed = fingerprint_differences(first, run_fingerprint(PipelineConfig.model_validate(raw), "d2", "m1"))
    assert changed == ["lora.r: 8 -> 16", "data digest d1 -> d2"]


@pytest.mark.slow
def test_task_retry_continues_its_own_run_folder(prefect_server, tiny_llama_dir, tmp_path, monkeypatch):
    """train-adapter fails once after checkpoint-4 with a failure a retry can fix (a lost process); Prefect's retry
    gets the base model back (the failed attempt unloaded its adapter) and continues that folder's checkpoint."""
    from qlora import train
    from qlora.errors import LostProcessError

    original = train.RunLoggerProgress.on_step_end if hasattr(train.RunLoggerProgress, "on_step_end") else None
    failed = []

    def fail_once(self, args, state, control, **kwargs):
        if state.global_step == 5 and not failed:
            failed.append(state.global_step)
            raise LostProcessError("transient failure (test)")
        return original(self, args, state, control, **kwargs) if original else None

    monkeypatch.setattr(train.RunLoggerProgress, "on_step_end", fail_once, raising=False)
    config = _config(tiny_llama_dir, tmp_path, "retry")
    summary = finetune(config_path=str(config), overrides=["training.max_steps=8", "training.task_retries=1"])

    assert failed == [5]
    assert Path(summary["resumed_from"]) == Path(summary["run_dir"]) / "checkpoint-4"
    assert [p.name for p in (tmp_path / "retry").iterdir() if (p / "run.json").is_file()] == [
        Path(summary["run_dir"]).name
    ]
    assert summary["train"]["train_steps"] == 8
