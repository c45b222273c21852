"""Training through Ray Train (`distributed.launcher: ray`) on a real Ray cluster of two nodes on this machine
(`ray start --head` and a second `ray start --address=...`, each offering one `worker_slot`, so each holds one
worker), on the CPU (gloo), with the tiny model and the real flow.

The workers are instrumented through a `sitecustomize` on their PYTHONPATH (test-only, forwarded to them by the
launcher): a rank can be made to raise, or to kill its own process once, mid-training.
"""

from __future__ import annotations

import json
import os
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

from qlora.bundled_data import generate_orders
from tests.conftest import free_port, tiny_config_dict

pytest.importorskip("ray.train")
pytestmark = pytest.mark.slow

SITECUSTOMIZE = """
import os, signal
import transformers

_step = transformers.Trainer.training_step


def training_step(self, model, inputs, *args, **kwargs):
    rank = os.environ.get("RANK", "0")
    if os.environ.get("QLORA_TEST_FAIL_RANK") == rank:
        raise RuntimeError(f"rank {rank} broke on purpose (test)")
    marker = os.environ.get("QLORA_TEST_KILL_MARKER")
    if (
        os.environ.get("QLORA_TEST_KILL_RANK") == rank
        and self.state.global_step == int(os.environ["QLORA_TEST_KILL_AFTER_STEP"])
        and marker and not os.path.exists(marker)
    ):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies as on a lost node: no error, no goodbye
    return _step(self, model, inputs, *args, **kwargs)


transformers.Trainer.training_step = training_step
"""


def _ray_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats", *args]


def _alive_nodes(address: str) -> int:
    probe = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", probe % address], capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Two Ray nodes on this machine, one `worker_slot` and one CPU each; their address."""
    logs = tmp_path_factory.mktemp("ray-nodes")
    # Ray 2.60 clusters authenticate with a token (`ray start --head` writes ~/.ray/auth_token); a process connecting
    # to one by address uses it only with RAY_AUTH_MODE=token, which a user sets where the flow runs
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", '--resources={"worker_slot": 1}', "--object-store-memory=100000000"]
    head = subprocess.Popen(
        _ray_command("--head", f"--port={port}", "--include-dashboard=false", *common),
        stdout=(logs / "head.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    nodes = [head]
    try:
        deadline = time.monotonic() + 60
        while _alive_nodes(address) < 1:
            assert head.poll() is None and time.monotonic() < deadline, (logs / "head.log").read_text()[-2000:]
            time.sleep(1)
        second = subprocess.Popen(
            _ray_command(f"--address={address}", f"--dashboard-agent-listen-port={free_port()}", *common),
            stdout=(logs / "node.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        nodes.append(second)
        while _alive_nodes(address) < 2:
            assert second.poll() is None and time.monotonic() < deadline, (logs / "node.log").read_text()[-2000:]
            time.sleep(1)
        yield address
    finally:
        for node in reversed(nodes):  # `ray start --block` stops its own node's processes on SIGTERM
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        if saved_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_mode


@pytest.fixture
def instrumented_workers(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return site


def _config(tiny_llama_dir, tmp_path: Path, name: str, **distributed) -> Path:
    raw = tiny_config_dict(tiny_llama_dir, tmp_path)
    raw["training"].update(
        max_steps=4, save_steps=2, logging_steps=1, packing=False, task_retries=0, output_dir=str(tmp_path / name)
    )
    raw["registry"] = {"enabled": False}
    raw["distributed"] = distributed
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _ray(address: str, **more) -> dict:
    return {
        "launcher": "ray",
        "num_processes": 2,
        "ray_address": address,
        "ray_resources_per_worker": {"worker_slot": 1.0},
        **more,
    }


def _adapter(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(summary["run_dir"]) / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_llama_dir, tmp_path_factory, prefect_server):
    """One run through Ray on the two nodes, untouched: (summary, config path)."""
    from flows.finetune import finetune

    tmp_path = tmp_path_factory.mktemp("ray-run")
    config = _config(tiny_llama_dir, tmp_path, "ray", **_ray(ray_cluster, ray_placement="STRICT_SPREAD"))
    # Run from a folder of its own, with a data file named relative to it: the workers (started by nodes that run
    # elsewhere) must find it, and the prepared-data cache below it, as torchrun's processes would.
    raw = yaml.safe_load(config.read_text())
    rows = generate_orders(200, 40, 7)
    (tmp_path / "orders.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["train"] + rows["test"]))
    raw["data"] = {"source": "orders.jsonl", "max_train_rows": 64, "max_eval_rows": 16}
    config.write_text(yaml.safe_dump(raw))
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        return finetune(config_path=str(config)), config
    finally:
        os.chdir(here)


def test_two_ray_workers_on_two_nodes_train_the_adapter_torchrun_trains(uninterrupted, tiny_llama_dir, tmp_path):
    from flows.finetune import finetune

    summary, config = uninterrupted
    raw = yaml.safe_load(config.read_text())
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(raw["tracking"]["experiment_name"]).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == summary["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]  # rank 0's only
    assert run.data.metrics["ray_worker_group_restarts"] == 0
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "train-result.json").read_text())["world_size"] == 2
    (attempt,) = (run_dir / "launch-logs").iterdir()
    assert (attempt / "rank-1.log").stat().st_size > 0  # rank 1's output in its file, rank 0's in the flow's log
    assert summary["finetuned"]["eval_loss"] < summary["base"]["eval_loss"]

    torchrun = tmp_path / "torchrun.yaml"
    raw["distributed"] = {"num_processes": 2, "main_process_port": free_port()}
    raw["training"]["output_dir"] = str(tmp_path / "torchrun")
    raw["data"]["source"] = str(config.parent / raw["data"]["source"])
    torchrun.write_text(yaml.safe_dump(raw))
    _assert_same_adapter(_adapter(finetune(config_path=str(torchrun))), _adapter(summary))


def test_a_killed_worker_is_restarted_and_training_continues_from_the_checkpoint(
    uninterrupted, ray_cluster, tiny_llama_dir, tmp_path, instrumented_workers, monkeypatch
):
    """Rank 1's process dies (SIGKILL) in step 3, after the checkpoint of step 2: Ray restarts the worker group,
    which resumes from checkpoint-2 and ends at step 4 with the adapter of the run nobody disturbed."""
    from flows.finetune import finetune

    monkeypatch.setenv("QLORA_TEST_KILL_RANK", "1")
    monkeypatch.setenv("QLORA_TEST_KILL_AFTER_STEP", "2")
    monkeypatch.setenv("QLORA_TEST_KILL_MARKER", str(tmp_path / "killed-once"))
    first = uninterrupted[1]
    raw = yaml.safe_load(first.read_text())  # the same run, but for the folder, the kill and one restart allowed
    raw["data"]["source"] = str(first.parent / raw["data"]["source"])
    raw["training"]["output_dir"] = str(tmp_path / "ray-kill")
    raw["distributed"]["max_failures"] = 1
    config = tmp_path / "ray-kill.yaml"
    config.write_text(yaml.safe_dump(raw))
    summary = finetune(config_path=str(config))
    assert (tmp_path / "killed-once").exists()
    assert summary["train"]["train_steps"] == 4
    (attempt,) = (Path(summary["run_dir"]) / "launch-logs").iterdir()
    starts = [json.loads(line) for line in (attempt / "worker-group-starts.jsonl").read_text().splitlines()]
    assert [s["resumed_from"] for s in starts] == [None, "checkpoint-2"]
    raw = yaml.safe_load(config.read_text())
    run = MlflowClient(raw["tracking"]["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["ray_worker_group_restarts"] == 1
    assert run.data.tags["ray_restarts_resumed_from"] == "checkpoint-2"
    _assert_same_adapter(_adapter(summary), _adapter(uninterrupted[0]))


def test_a_worker_failing_past_max_failures_fails_the_task_with_its_error(
    ray_cluster, tiny_llama_dir, tmp_path, instrumented_workers, monkeypatch, prefect_server
):
    from flows.finetune import finetune

    monkeypatch.setenv("QLORA_TEST_FAIL_RANK", "1")
    config = _config(tiny_llama_dir, tmp_path, "ray-fail", **_ray(ray_cluster, max_failures=1))
    with pytest.raises(Exception, match=r"rank 1 failed: RuntimeError: rank 1 broke on purpose \(test\) \(after 1 "):
        finetune(config_path=str(config))
    raw = yaml.safe_load(config.read_text())
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(raw["tracking"]["experiment_name"]).experiment_id])
    assert run.info.status == "FAILED"
    (run_dir,) = (tmp_path / "ray-fail").iterdir()
    assert not (run_dir / "RUN_FINISHED").exists()  # left to resume


def test_more_workers_than_the_cluster_can_place_is_a_clear_error(
    ray_cluster, tiny_llama_dir, tmp_path, prefect_server
):
    from flows.finetune import finetune
    from qlora.errors import PipelineInputError

    config = _config(tiny_llama_dir, tmp_path, "ray-big", **_ray(ray_cluster, num_processes=3))
    started = time.monotonic()
    with pytest.raises(PipelineInputError, match=r"num_processes 3: the Ray cluster .* can place 2 worker\(s\)"):
        finetune(config_path=str(config))
    assert time.monotonic() - started < 120


def test_an_unreachable_ray_address_or_no_ray_is_named_before_any_weights_load(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    """`qlora-flow validate` (the preflight every run starts with) says what is wrong within seconds, exit 2."""
    from flows.cli import main
    from qlora import ray_launch

    address = f"127.0.0.1:{free_port()}"
    config = _config(tiny_llama_dir, tmp_path, "ray-bad", **_ray(address))
    started = time.monotonic()
    assert main(["validate", "--config", str(config)]) == 2
    assert time.monotonic() - started < 60
    assert f"distributed.ray_address {address}: no Ray cluster answers there" in capsys.readouterr().err

    monkeypatch.setattr(ray_launch, "ray_available", lambda: False)
    assert main(["validate", "--config", str(config)]) == 2
    assert "distributed.launcher ray needs Ray Train: pip install -e '.[ray]'" in capsys.readouterr().err


def test_sigterm_stops_every_ray_worker_at_one_step_with_a_checkpoint(
    ray_cluster, tiny_llama_dir, tmp_path, prefect_server
):
    """SIGTERM to `qlora-flow run`'s process group: the launcher passes the stop to the workers (a file in the run
    folder, which every rank watches), they stop at the same optimizer step with a checkpoint, the command exits 143
    and the MLflow run ends KILLED; the run folder then resumes."""
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import start_in_own_session, stop_process_group

    config = _config(tiny_llama_dir, tmp_path, "ray-stop", **_ray(ray_cluster))
    raw = yaml.safe_load(config.read_text())
    raw["training"].update(max_steps=40, stop_grace_s=60)
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "stopped.log"
    proc = start_in_own_session([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], log, env)
    root = tmp_path / "ray-stop"
    try:
        deadline = time.monotonic() + 300
        while not list(root.glob("*/checkpoint-*")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        code, took_s = stop_process_group(proc, signal.SIGTERM, timeout_s=90)
    printed = log.read_text()
    assert code == 143 and took_s < 65, printed[-3000:]
    (run_dir,) = root.iterdir()
    stopped = json.loads((run_dir / "train-stopped.json").read_text())
    assert 2 <= stopped["step"] < 40 and (run_dir / f"checkpoint-{stopped['step']}").is_dir()
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name(raw["tracking"]["experiment_name"]).experiment_id])
    assert run.info.status == "KILLED"
