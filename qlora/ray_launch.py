"""Training on a Ray cluster through Ray Train (`distributed.launcher: ray`).

train-adapter runs this module as its launcher process, where it would run torchrun (qlora/distributed.py):

    python -m qlora.ray_launch <run folder>/launch-spec.json <run folder>/launch-logs/attempt-N

It connects to the cluster (`distributed.ray_address`), checks that the cluster can place the workers, and hands
Ray Train's `TorchTrainer` the per-rank function every torchrun process runs (`qlora.distributed_train.run_rank`):
Ray starts the workers where `ScalingConfig` says, sets up their process group (gloo on CPUs, NCCL on GPUs) and the
torch.distributed environment the Trainer reads, so DDP and FSDP run as under torchrun. When a worker or its node
dies, Ray restarts the whole worker group (`FailureConfig(max_failures)`) and the function starts again: it resumes
from the run folder's newest complete checkpoint, with the Trainer's own data order, as a resumed run does. Rank 0
notes each start of the worker group, and the checkpoint it resumes from, in `worker-group-starts.jsonl` of the
attempt's log folder (Ray does not number them for the workers); the flow logs them.

The run folder must be on storage every node sees (a shared file system path): rank 0 writes the checkpoints that a
restarted group, possibly on other nodes, resumes from, and the adapter the flow evaluates.

Failures come back as `launch-failure.json` in the log folder: `input` (no Ray, an unreachable cluster, workers the
cluster cannot place: nothing was loaded) or `worker` (a rank's own error, after the restarts allowed). Ray is
imported only here and in the workers, so the project runs without it unless this launcher is chosen.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from qlora.files import write_text_atomic

FAILURE_NAME = "launch-failure.json"
STARTS_NAME = "worker-group-starts.jsonl"
STOP_REQUEST_NAME = "stop-requested"  # written into the run folder: every rank stops at its next step
RAY_MISSING = "distributed.launcher ray needs Ray Train: pip install -e '.[ray]' (ray[train]==2.60.0)"
# What the workers get of the launcher's environment (Ray starts them from its node's environment, not this one):
# where to log (the flow's MLflow run), where to import from, offline switches. Never tokens: a worker reads the
# model the flow already resolved, and Ray keeps a job's runtime environment where its dashboard shows it.
FORWARDED_PREFIXES = ("MLFLOW_", "QLORA_", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")
FORWARDED = ("PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "TMPDIR")

log = logging.getLogger("qlora.ray")


def ray_available() -> bool:
    try:
        import ray.train  # noqa: F401
    except ImportError:
        return False
    return True


def address_problem(address: str, timeout_s: float = 3.0) -> str | None:
    """Why `distributed.ray_address` cannot be reached, within `timeout_s` (Ray itself keeps retrying for minutes
    before it gives up on an address where nothing listens); None if it answers or names no host."""
    if address in ("local", "auto"):
        return None
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return f"distributed.ray_address {address!r} is not 'local', 'auto', 'host:port' or 'ray://host:port'"
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return (
            f"distributed.ray_address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
            "(`ray start --head`) or correct the address"
        )
    return None


def ray_problems(cfg) -> list[str]:
    """What stops a Ray launch before anything loads: Ray missing, an address nobody answers at."""
    if cfg.distributed.launcher != "ray":
        return []
    if not ray_available():
        return [RAY_MISSING]
    problem = address_problem(cfg.distributed.ray_address)
    return [problem] if problem else []


def worker_resources(cfg, device: str) -> dict[str, float]:
    """What one worker asks of the cluster: a CPU, a GPU on a GPU run, and the configured custom resources."""
    return {"CPU": 1.0, **({"GPU": 1.0} if device == "cuda" else {}), **cfg.distributed.ray_resources_per_worker}


def placeable_workers(nodes: list[dict], per_worker: dict[str, float]) -> int:
    """How many workers asking `per_worker` each the live `nodes` (ray.nodes()) can hold, all resources free."""
    total = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        total += min(int(have.get(k, 0.0) // v) for k, v in per_worker.items() if v > 0)
    return total


def read_starts(log_dir: Path) -> list[dict]:
    """The worker group's starts rank 0 noted in `log_dir`, in order (one line each)."""
    path = Path(log_dir) / STARTS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fail(log_dir: Path, kind: str, message: str, rank: int | None = None) -> int:
    write_text_atomic(log_dir / FAILURE_NAME, json.dumps({"kind": kind, "message": message, "rank": rank}))
    print(message, file=sys.stderr, flush=True)
    return 2 if kind == "input" else 1


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in FORWARDED or k.startswith(FORWARDED_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_loop(config: dict) -> None:
    """What every Ray Train worker runs, once per start of the worker group: the per-rank training function of a
    torchrun process. Rank 0 first notes the start and the checkpoint it resumes from; other ranks write their
    output into the log folder (rank 0's reaches the flow's log through the launcher)."""
    import contextlib

    import ray.train

    from qlora.distributed_train import run_rank
    from qlora.stop import stop_when_file_appears
    from qlora.train import latest_complete_checkpoint

    context = ray.train.get_context()
    rank = context.get_world_rank()
    log_dir, run_dir = Path(config["log_dir"]), Path(config["run_dir"])
    # The config's relative paths (the model cache, data files, the prepared-data cache) are the flow's working
    # folder's, as for a torchrun process, which inherits it; Ray starts a worker in a folder of its own.
    if not Path(config["cwd"]).is_dir():
        raise RuntimeError(
            f"the flow's working folder {config['cwd']} does not exist on this node: run the flow where every node "
            "has the same folder (the image's /opt/qlora-flow), with the run folder on storage they share"
        )
    os.chdir(config["cwd"])
    if rank == 0:
        starts = read_starts(log_dir)
        resumed = latest_complete_checkpoint(str(run_dir))
        start = {"start": len(starts), "resumed_from": Path(resumed).name if resumed else None, "time": time.time()}
        with (log_dir / STARTS_NAME).open("a") as fh:
            fh.write(json.dumps(start) + "\n")
        if starts:
            print(
                f"Ray restarted the worker group (restart {len(starts)} of at most "
                f"{config['max_failures'] if config['max_failures'] >= 0 else 'any number'}): training continues "
                f"from {start['resumed_from'] or 'step 0 (no complete checkpoint yet)'}",
                flush=True,
            )
    output = contextlib.nullcontext()
    if rank != 0:
        sink = open(log_dir / f"rank-{rank}.log", "a", buffering=1)  # noqa: SIM115  (closed below)
        output = contextlib.ExitStack()
        output.enter_context(sink)
        output.enter_context(contextlib.redirect_stdout(sink))
        output.enter_context(contextlib.redirect_stderr(sink))
    with output:

        def file_stop(grace_s: float):
            return stop_when_file_appears(run_dir / STOP_REQUEST_NAME, grace_s)

        code = run_rank(config["spec"], file_stop, cuda_device=_ray_cuda_index())
    if code not in (0, None) and not (run_dir / STOP_REQUEST_NAME).exists():
        raise RuntimeError(f"rank {rank} ended with exit code {code}")


def _ray_cuda_index() -> int | None:
    import ray.train.torch

    device = ray.train.torch.get_device()
    return device.index if device.type == "cuda" else None


def _connect(address: str, workers: int) -> None:
    import ray

    common = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address == "local":  # a Ray instance of this run's own, on this machine: the workers are this machine's
        ray.init(address="local", num_cpus=max(workers, os.cpu_count() or 1), **common)
    else:
        ray.init(address=address, **common)


def main(argv: list[str] | None = None) -> int:
    from qlora.processes import die_with_parent

    die_with_parent()  # the flow's child, like torchrun: never outlive it
    spec_path, log_dir = (Path(a) for a in (argv or sys.argv[1:])[:2])
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads(spec_path.read_text())
    from pipeline_config.loading import load_pipeline_config

    cfg = load_pipeline_config(spec["config"])
    d, device, run_dir = cfg.distributed, spec["device"], Path(spec["run_dir"])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if problems := ray_problems(cfg):
        return _fail(log_dir, "input", problems[0])
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray retries a worker group that cannot start without end by default; a run fails after ray_start_timeout_s
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(d.ray_start_timeout_s)
    try:
        _connect(d.ray_address, d.num_processes)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        return _fail(log_dir, "input", f"distributed.ray_address {d.ray_address}: cannot connect to Ray ({exc})")
    try:
        per_worker = worker_resources(cfg, device)
        placeable = placeable_workers(ray.nodes(), per_worker)
        if placeable < d.num_processes:
            return _fail(
                log_dir,
                "input",
                f"distributed.num_processes {d.num_processes}: the Ray cluster at {d.ray_address} can place "
                f"{placeable} worker(s) needing {per_worker} each; add nodes, or lower num_processes or "
                "ray_resources_per_worker",
            )
        log.info(
            "Ray cluster %s: %d node(s); %d worker(s) of %s, placement %s, max_failures %d",
            d.ray_address,
            sum(1 for n in ray.nodes() if n.get("Alive")),
            d.num_processes,
            per_worker,
            d.ray_placement,
            d.max_failures,
        )
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={
                "spec": str(spec_path.resolve()),
                "cwd": os.getcwd(),  # the flow's: this process runs where the flow runs
                "log_dir": str(log_dir.resolve()),
                "run_dir": str(run_dir),
                "max_failures": d.max_failures,
            },
            torch_config=TorchConfig(backend="nccl" if device == "cuda" else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=d.num_processes,
                use_gpu=device == "cuda",
                resources_per_worker=per_worker,
                placement_strategy=d.ray_placement,
            ),
            run_config=RunConfig(
                name="ray-train",
                storage_path=str(log_dir.resolve()),
                # a worker group that cannot start is the cluster's problem, not a worker's: fail, don't loop
                failure_config=FailureConfig(max_failures=d.max_failures, controller_failure_limit=0),
                worker_runtime_env={"env_vars": _worker_env()},
            ),
        )
        # ray.init replaced SIGTERM's handler: a stop from the flow becomes the file every rank watches
        signal.signal(signal.SIGTERM, lambda *_: (run_dir / STOP_REQUEST_NAME).touch())
        try:
            trainer.fit()
        except ray.train.WorkerGroupError as exc:
            return _worker_failure(log_dir, exc)
        except ray.train.ControllerError as exc:
            return _fail(log_dir, "input", f"Ray could not start the workers: {exc.controller_failure}")
        return 0
    finally:
        ray.shutdown()


def _worker_failure(log_dir: Path, exc) -> int:
    """The failure to report: the first rank's own error; a rank that died with its peer's connection is not it."""
    from qlora.distributed import CONSEQUENCE_MARKERS

    failures = sorted(exc.worker_failures.items())
    causes = [(r, e) for r, e in failures if not any(m in str(e) for m in CONSEQUENCE_MARKERS)]
    rank, error = (causes or failures)[0]
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return _fail(log_dir, "worker", f"{type(error).__name__}: {message}", rank)


if __name__ == "__main__":
    raise SystemExit(main())
