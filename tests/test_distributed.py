"""Training on several processes through torchrun, on the CPU (gloo), with the tiny model and the real flow.

The children are instrumented through a `sitecustomize` on their PYTHONPATH (test-only): it records the packed rows
each rank trained on, and can make one rank fail.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flows.finetune import finetune
from tests.conftest import free_port, start_in_own_session, stop_process_group, tiny_config_dict

pytestmark = pytest.mark.slow

SITECUSTOMIZE = """
import hashlib, json, os
import transformers

_step = transformers.Trainer.training_step


def training_step(self, model, inputs, *args, **kwargs):
    rank = os.environ.get("RANK", "0")
    if os.environ.get("QLORA_TEST_FAIL_RANK") == rank:
        raise RuntimeError(f"rank {rank} broke on purpose (test)")
    rows = inputs["input_ids"].tolist()
    with open(os.path.join(os.environ["QLORA_TEST_SHARD_DIR"], f"rank{rank}.jsonl"), "a") as fh:
        for row in rows:
            fh.write(json.dumps(hashlib.sha256(str(row).encode()).hexdigest()) + "\\n")
    return _step(self, model, inputs, *args, **kwargs)


transformers.Trainer.training_step = training_step
"""


@pytest.fixture
def instrumented_children(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    shards = tmp_path / "shards"
    shards.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("QLORA_TEST_SHARD_DIR", str(shards))
    return shards


def _config(tiny_llama_dir, tmp_path, **distributed) -> Path:
    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    raw["training"].update(max_steps=4, save_steps=2, logging_steps=1, packing=False, task_retries=0)
    raw["distributed"] = {"main_process_port": free_port(), **distributed}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _runs(config: Path):
    raw = yaml.safe_load(config.read_text())
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name(raw["tracking"]["experiment_name"])
    return client, client.search_runs([exp.experiment_id])


def _shards(folder: Path) -> dict[str, set[str]]:
    return {p.stem: {json.loads(line) for line in p.read_text().splitlines()} for p in folder.glob("rank*.jsonl")}


def _check_one_run_from_rank_0(config: Path, summary: dict) -> None:
    client, runs = _runs(config)
    (run,) = runs  # exactly one MLflow run holds the metrics
    assert run.info.status == "FINISHED" and run.info.run_id == summary["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4]  # logged once per step: by rank 0 only
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "train-result.json").read_text())["world_size"] == 2
    # The adapter the flow saved (and logged, and evaluated) is rank 0's.
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    rank0 = load_file(str(run_dir / "trained-adapter" / "adapter_model.safetensors"))
    assert saved.keys() == rank0.keys() and len(saved) > 0
    for key in saved:
        torch.testing.assert_close(saved[key], rank0[key], rtol=0, atol=0)
    assert summary["finetuned"]["eval_loss"] < summary["base"]["eval_loss"]


def test_two_processes_train_one_run_logged_by_rank_0_on_disjoint_shards(
    prefect_server, tiny_llama_dir, tmp_path, instrumented_children
):
    config = _config(tiny_llama_dir, tmp_path, num_processes=2)
    summary = finetune(config_path=str(config))
    _check_one_run_from_rank_0(config, summary)
    shards = _shards(instrumented_children)
    assert set(shards) == {"rank0", "rank1"} and all(shards.values())
    assert not shards["rank0"] & shards["rank1"]  # the two ranks saw disjoint rows


def test_two_machines_on_one_host(prefect_server, tiny_llama_dir, tmp_path, instrumented_children):
    """num_machines 2, one process each: the flow launches machine 0; the test starts machine 1's launcher, as the
    second machine's worker would, on the spec the flow wrote; they meet on 127.0.0.1."""
    import subprocess
    import sys

    port = free_port()
    config = _config(tiny_llama_dir, tmp_path, num_machines=2, main_process_ip="127.0.0.1", main_process_port=port)
    result: dict = {}
    flow = threading.Thread(target=lambda: result.update(summary=finetune(config_path=str(config))))
    flow.start()
    deadline = time.monotonic() + 300
    while not (specs := list((tmp_path / "out").glob("*/launch-spec.json"))):
        assert flow.is_alive() and time.monotonic() < deadline, "machine 0 never launched"
        time.sleep(0.2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--nnodes", "2"]
    cmd += ["--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ["PYTHONPATH"]])}
    machine1 = subprocess.run(
        [*cmd, "-m", "qlora.distributed_train", str(specs[0])], env=env, capture_output=True, text=True, timeout=600
    )
    flow.join(timeout=600)
    assert machine1.returncode == 0, machine1.stdout[-2000:] + machine1.stderr[-2000:]
    _check_one_run_from_rank_0(config, result["summary"])
    shards = _shards(instrumented_children)
    assert set(shards) == {"rank0", "rank1"} and not shards["rank0"] & shards["rank1"]


def test_a_crash_in_rank_1_fails_the_task_with_its_error(
    prefect_server, tiny_llama_dir, tmp_path, instrumented_children, monkeypatch
):
    """An error in the code (here: a rank that raises) fails the task at once, with that rank's error: no retry,
    although `training.task_retries` allows one (it would only fail again)."""
    monkeypatch.setenv("QLORA_TEST_FAIL_RANK", "1")
    config = _config(tiny_llama_dir, tmp_path, num_processes=2)
    raw = yaml.safe_load(config.read_text())
    raw["training"]["task_retries"] = 1
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match=r"rank 1 failed: .*rank 1 broke on purpose \(test\)"):
        finetune(config_path=str(config))
    _, runs = _runs(config)
    assert [r.info.status for r in runs] == ["FAILED"]
    (run_dir,) = (tmp_path / "out").iterdir()
    assert [p.name for p in (run_dir / "launch-logs").iterdir()] == ["attempt-0"]  # launched once


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _alive(processes) -> list:
    import psutil

    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _start_cli(config: Path, log: Path, env: dict, *overrides: str):
    import sys

    sets = [arg for item in overrides for arg in ("--set", item)]
    return start_in_own_session([sys.executable, "-m", "flows.cli", "run", "--config", str(config), *sets], log, env)


def _wait_for_checkpoint(root: Path, proc, log: Path, after: int = 0) -> int:
    deadline = time.monotonic() + 300
    while True:
        steps = [int(p.name.split("-")[1]) for p in root.glob("*/checkpoint-*") if p.name.split("-")[1].isdigit()]
        if steps and max(steps) > after:
            return max(steps)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no new checkpoint within 300 s"
        time.sleep(0.05)


def test_sigterm_reaches_every_rank_sigkill_leaves_no_process_and_a_damaged_checkpoint_is_skipped(
    prefect_server, tiny_llama_dir, tmp_path
):
    """Two training processes under `qlora-flow run`, against a Prefect server with a GPU slot limit:

    1. SIGTERM to the command's process group (what `timeout`, systemd and Kubernetes send): one SIGTERM reaches
       torchrun and every rank, they stop at the same step with a checkpoint, the command exits 143 within the grace
       period; torchrun and the ranks are gone, the GPU slot and the folder lock released, MLflow KILLED, the flow
       run Crashed.
    2. The re-run resumes; SIGKILL of the command alone: torchrun and both ranks die with it.
    3. The newest checkpoint is then truncated. The next run marks the killed flow run Crashed, sets the damaged
       checkpoint aside (naming the file), resumes from the one before and finishes."""
    import signal
    import uuid

    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.settings import PREFECT_API_URL

    from qlora.run_folder import RunLock

    limit_name = f"gpu-{uuid.uuid4().hex[:8]}"
    config = _config(tiny_llama_dir, tmp_path, num_processes=2)
    raw = yaml.safe_load(config.read_text())
    raw["training"].update(
        max_steps=14,
        save_total_limit=3,
        stop_grace_s=20,
        gpu_slots=1,
        gpu_concurrency_limit=limit_name,
    )
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}
    root = tmp_path / "out"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name, limit=1))

        # 1. SIGTERM to the process group
        log = tmp_path / "stopped.log"
        proc = _start_cli(config, log, env)
        try:
            _wait_for_checkpoint(root, proc, log)
            children = _descendants(proc.pid)
            ranks = [c for c in children if "qlora.distributed_train" in " ".join(c.cmdline())]
            assert len([r for r in ranks if "torch.distributed.run" not in " ".join(r.cmdline())]) == 2
        finally:
            code, took_s = stop_process_group(proc, signal.SIGTERM)
        printed = log.read_text()
        assert code == 143 and took_s < 25, printed[-3000:]
        assert "stopped: stopped by SIGTERM at step" in printed and "written)" in printed, printed[-3000:]
        time.sleep(1)
        assert not _alive(children)
        (run_dir,) = root.iterdir()
        stopped = json.loads((run_dir / "train-stopped.json").read_text())
        assert (run_dir / f"checkpoint-{stopped['step']}").is_dir()
        lock = RunLock(run_dir)
        assert lock.acquire()
        lock.release()
        assert client.read_global_concurrency_limit_by_name(limit_name).active_slots == 0
        _, runs = _runs(config)
        assert [r.info.status for r in runs] == ["KILLED"]
        assert runs[0].data.tags["stopped_at_step"] == str(stopped["step"])
        flow_runs = {r.name: r for r in client.read_flow_runs() if r.name in printed}
        assert [r.state.type.value for r in flow_runs.values()] == ["CRASHED"]

        # 2. the re-run resumes; SIGKILL of the command alone. (Without the GPU limit from here on: the killed run's
        # slot would come back only when its lease runs out, through a service the test's server does not run.)
        log = tmp_path / "killed.log"
        proc = _start_cli(config, log, env, "training.gpu_slots=0")
        try:
            _wait_for_checkpoint(root, proc, log, after=stopped["step"])
            children = _descendants(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(children), [c.cmdline() for c in _alive(children)]
        killed_run = json.loads((run_dir / "run.json").read_text())["attempts"][-1]

        # 3. a damaged newest checkpoint
        newest = max((p for p in run_dir.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
        weights = newest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        log = tmp_path / "finished.log"
        proc = _start_cli(config, log, env, "training.gpu_slots=0")
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        printed = log.read_text()
        assert f"flow run {killed_run['flow_run_name']} ({killed_run['flow_run_id']}): marked Crashed" in printed
        assert client.read_flow_run(killed_run["flow_run_id"]).state.type.value == "CRASHED"
        assert f"{newest.name} is damaged (adapter_model.safetensors: missing or sha256 mismatch)" in printed
        assert (run_dir / f"damaged-{newest.name}").is_dir() and (run_dir / "RUN_FINISHED").is_file()
        resumed_from = json.loads((run_dir / "train-result.json").read_text())["resumed_from"]
        assert int(Path(resumed_from).name.split("-")[1]) < int(newest.name.split("-")[1])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_on_two_gpus_shards_the_model_and_saves_one_adapter_that_reloads(prefect_server, tiny_llama_dir, tmp_path):
    """FSDP-QLoRA through the flow: each rank holds about half the weights, the adapter gathered from the shards is
    one ordinary PEFT adapter (the flow reloads it onto the 4-bit base on one GPU and evaluates it), checkpoints
    are written, and only rank 0 logs."""
    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    raw["training"].update(max_steps=4, save_steps=2, logging_steps=1, packing=False, task_retries=0, device="cuda")
    raw["quantization"].update(compute_dtype="bfloat16", quant_storage_dtype="bfloat16")  # FSDP-QLoRA's settings
    raw["training"]["bf16"] = True
    raw["distributed"] = {"num_processes": 2, "strategy": "fsdp", "main_process_port": free_port()}
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(raw))
    summary = finetune(config_path=str(config))
    _check_one_run_from_rank_0(config, summary)
    run_dir = Path(summary["run_dir"])
    result = json.loads((run_dir / "train-result.json").read_text())
    assert 0.45 < result["metrics"]["fsdp_local_parameter_share"] < 0.6  # rank 0's shards: half, plus padding
    assert len(result["peak_memory_mib_per_rank"]) == 2
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_a_dpo_stage_on_two_processes_answers_its_prompts_once_between_them(prefect_server, tiny_llama_dir, tmp_path):
    """preference.policy_rejected under torchrun: each rank answers half the prompts, both train on all the answers
    (in row order), rank 0 keeps them in the run folder and the flow logs the count."""
    from tests.test_stages import _write_rows, order_stage_rows

    config = _config(tiny_llama_dir, tmp_path, num_processes=2)
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {"source": _write_rows(tmp_path / "pairs.jsonl", order_stage_rows(24, 4, "preference"))}
    raw["training"].update(method="dpo", max_steps=2, save_steps=0, per_device_train_batch_size=2)
    raw["preference"] = {"policy_rejected": {"max_prompts": 6, "max_new_tokens": 4, "batch_size": 2}}
    raw["registry"] = {"enabled": False}
    config.write_text(yaml.safe_dump(raw))
    summary = finetune(config_path=str(config))
    run_dir = Path(summary["run_dir"])
    answers = [json.loads(line) for line in (run_dir / "policy-answers.jsonl").read_text().splitlines()]
    assert [a["row"] for a in answers] == list(range(6)) and all(a["answer"] for a in answers)
    assert json.loads((run_dir / "train-result.json").read_text())["world_size"] == 2
    client, (run,) = _runs(config)
    assert run.data.metrics["stage/policy_answered"] == 6 and run.data.metrics["stage/policy_mistakes"] == 6
