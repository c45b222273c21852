"""Training on several processes (GPUs) and machines, DDP or FSDP-QLoRA, launched with torch.distributed's own
launcher (torchrun).

With `distributed.num_processes` above 1 (or several machines), train-adapter does not train in the flow's process:

1. It writes a launch spec into the run folder: the resolved config as data, the resolved model source, the prepared
   dataset's folder, the fingerprint, the device.
2. It runs `python -m torch.distributed.run ... -m qlora.distributed_train <spec>`. torchrun starts one process per
   GPU (per CPU slot in tests), sets up the process group, and the Trainer shards the data and averages the LoRA
   gradients (DDP). Each rank loads the whole 4-bit model on its own device; with `strategy: fsdp` the Trainer then
   shards it across the ranks (qlora/train.py `fsdp_arguments`) and rank 0 receives the gathered adapter.
3. Only rank 0's output reaches the flow's log (torchrun's `--local-ranks-filter 0`; every rank's output is kept
   under `<run folder>/launch-logs/`), and only rank 0 logs into the flow's MLflow run (`MLFLOW_RUN_ID`; the
   Trainer's MLflow callback is active on the main process only).
4. Rank 0 saves the trained adapter and the training result into the run folder; the flow then loads base +
   adapter in its own process and evaluates, saves and registers them as for a one-process run.
A failing rank fails the task with the error of the rank that failed first (torchrun's error files, written by
`@record`), not the broken connections it leaves the others with. A rank killed from outside (no error file) is a
lost process, which a retry continues from the newest checkpoint. A graceful stop (qlora/stop.py) is forwarded to
torchrun as one SIGTERM, which passes it to every rank; the ranks agree on the step to stop at. torchrun runs in a
session of its own and dies with the flow's process, and each rank with torchrun (qlora/processes.py): no orphans.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline_config.schema import DistributedConfig, PipelineConfig
from qlora.errors import LostProcessError
from qlora.files import write_text_atomic
from qlora.model_source import ModelSource
from qlora.processes import die_with_parent
from qlora.stop import current as current_stop

SPEC_NAME = "launch-spec.json"
STOPPED_NAME = "train-stopped.json"  # rank 0's account of a graceful stop: signal, step, checkpoint
LOGS_DIRNAME = "launch-logs"


class DistributedTrainingError(RuntimeError):
    """A training process failed; the message names its rank and its error."""


def gather_per_rank(value: float) -> list[float]:
    """`value` from every process, in rank order (a collective: every rank calls it); [value] without a process
    group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    values: list[float] = [0.0] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def processes_per_machine(cfg: DistributedConfig, device: str) -> int:
    if cfg.num_processes == "auto":
        if device == "cuda":
            import torch

            return max(1, torch.cuda.device_count())
        return 1
    return cfg.num_processes


def is_distributed(cfg: PipelineConfig, device: str) -> bool:
    d = cfg.distributed
    return d.launcher == "ray" or processes_per_machine(d, device) > 1 or d.num_machines > 1


def write_launch_spec(
    run_dir: Path, cfg: PipelineConfig, source: ModelSource, prepared, fingerprint, device, starting=None
) -> Path:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "source": {**asdict(source), "model": source.model.model_dump(mode="json")},
        "prepared": asdict(prepared),
        "run_dir": str(run_dir.resolve()),
        "fingerprint": fingerprint,
        "device": device,
        "starting": asdict(starting) if starting is not None else None,  # a stage's starting adapter, resolved once
    }
    path = run_dir / SPEC_NAME
    write_text_atomic(path, json.dumps(spec, indent=1))
    return path


def launch_command(cfg: DistributedConfig, device: str, spec: Path, log_dir: Path) -> list[str]:
    """torchrun's command line for this machine (no launcher code of our own)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--nproc-per-node", str(processes_per_machine(cfg, device)), "--nnodes", str(cfg.num_machines)]
    cmd += ["--node-rank", str(cfg.machine_rank)]
    if cfg.rdzv_endpoint:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint]
    else:
        cmd += ["--master-addr", cfg.main_process_ip or "127.0.0.1", "--master-port", str(cfg.main_process_port)]
    cmd += ["--log-dir", str(log_dir), "--tee", "3", "--local-ranks-filter", "0"]
    return [*cmd, "-m", "qlora.distributed_train", str(spec)]


# A rank whose peer died fails too, with one of these: not the cause.
CONSEQUENCE_MARKERS = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer")


def first_failure(log_dir: Path, first_rank: int = 0) -> tuple[int, str] | None:
    """(rank, message) of the process that failed first, from the error files torchrun's `@record` wrote (one per
    failed local rank, with a timestamp); the others' errors are mostly the broken connection to it."""
    found = []
    for path in log_dir.rglob("error.json"):
        try:
            error = json.loads(path.read_text())["message"]
            message, stamp = error["message"].strip(), int(error.get("extraInfo", {}).get("timestamp", 0))
            local_rank = int(path.parent.name)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        consequence = any(marker in message for marker in CONSEQUENCE_MARKERS)
        found.append((stamp, consequence, first_rank + local_rank, message))
    if not found:
        return None
    _, _, rank, message = min(found)
    return rank, message


def run_distributed_training(
    cfg: PipelineConfig,
    source: ModelSource,
    prepared,
    run_dir: Path,
    fingerprint: dict[str, Any],
    device: str,
    env: dict[str, str],
    log: logging.Logger | logging.LoggerAdapter,
    starting=None,
) -> list[dict]:
    """Launch the training processes (torchrun, or Ray Train: qlora/ray_launch.py) and stream rank 0's output into
    `log`; rank 0 leaves the trained adapter and the training result in the run folder
    (qlora.train.save_training_outcome). Returns the starts of Ray's worker group (restarts after lost workers;
    none under torchrun). Raises DistributedTrainingError with the failing rank's error, LostProcessError when a
    process died without one (retried), PipelineInputError for a Ray cluster that cannot run the workers,
    RunInterrupted on a graceful stop (forwarded to torchrun, which passes it to every rank; under Ray a file every
    rank watches)."""
    from qlora.ray_launch import STOP_REQUEST_NAME

    spec = write_launch_spec(run_dir, cfg, source, prepared, fingerprint, device, starting)
    log_dir = run_dir / LOGS_DIRNAME / f"attempt-{len(list((run_dir / LOGS_DIRNAME).glob('attempt-*')))}"
    (run_dir / STOP_REQUEST_NAME).unlink(missing_ok=True)  # an earlier attempt's stop is not this one's
    ray = cfg.distributed.launcher == "ray"
    if ray:
        log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "qlora.ray_launch", str(spec), str(log_dir)]
    else:
        cmd = launch_command(cfg.distributed, device, spec, log_dir)
    log.info("launching %s", " ".join(cmd[1:]))
    repo = str(Path(__file__).resolve().parent.parent)
    child_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, child_env.get("PYTHONPATH")]))
    stop = current_stop()
    # torchrun in a session of its own: a Ctrl-C in the terminal reaches only the flow, which forwards one SIGTERM
    # (torchrun passes it to every rank once); and it dies with the flow's process if that is killed.
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env,
        bufsize=1,
        start_new_session=True,
        preexec_fn=die_with_parent,
    ) as proc:
        forwarding = stop.forwarding_to(lambda sig: proc.send_signal(signal.SIGTERM)) if stop else nullcontext()
        try:
            # the ranks stop at their next step; this process waits for them (within the grace period)
            with forwarding, stop.deferred() if stop else nullcontext():
                for line in proc.stdout:
                    line = line.rstrip()
                    if line:
                        log.info("%s", line)
                code = proc.wait()
        except BaseException:  # stopped at once: the ranks go with torchrun (they die with their parent)
            proc.kill()
            raise
    if stop is not None and stop.requested:
        stopped = _read_json(run_dir / STOPPED_NAME) or {}
        raise stop.interrupted(stopped.get("step"), stopped.get("checkpoint"))
    if ray:
        return _ray_outcome(code, log_dir)
    if code != 0:
        first_rank = cfg.distributed.machine_rank * processes_per_machine(cfg.distributed, device)
        if failure := first_failure(log_dir, first_rank):
            rank, message = failure
            raise DistributedTrainingError(f"training process rank {rank} failed: {message.splitlines()[-1]}")
        # No rank wrote an error: one was killed from outside (the OOM killer, a lost node), which a retry can fix.
        raise LostProcessError(
            f"torchrun exited with code {code} and no rank reported an error (a process was killed?); the ranks' "
            f"logs are in {log_dir}"
        )
    return []


def _ray_outcome(code: int, log_dir: Path) -> list[dict]:
    from qlora.errors import PipelineInputError
    from qlora.ray_launch import FAILURE_NAME, read_starts

    if code == 0:
        return read_starts(log_dir)
    failure = _read_json(log_dir / FAILURE_NAME)
    if failure is None:
        raise LostProcessError(f"the Ray launcher exited with code {code} without a report; its log is the task's")
    if failure["kind"] == "input":
        raise PipelineInputError(failure["message"])
    starts = len(read_starts(log_dir))
    raise DistributedTrainingError(
        f"training process rank {failure['rank']} failed: {failure['message']} (after {max(starts - 1, 0)} "
        "restart(s) of the worker group; distributed.max_failures)"
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
