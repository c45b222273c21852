"""The training entry point each process of a distributed run executes (qlora/distributed.py launches it):

    python -m torch.distributed.run --nproc-per-node N ... -m qlora.distributed_train <run folder>/launch-spec.json

or, under Ray Train (`distributed.launcher: ray`), `run_rank` in each worker (qlora/ray_launch.py).

The same functions as a one-process run: the one 4-bit loader, then `train_adapter` (SFTTrainer applies LoRA; the
Trainer shards the data and averages gradients across the processes torchrun set up, or, with
`distributed.strategy: fsdp`, shards the model itself).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from pipeline_config.loading import load_pipeline_config
from pipeline_config.schema import ModelConfig
from qlora.distributed import STOPPED_NAME, gather_per_rank
from qlora.files import write_text_atomic
from qlora.model import load_base_for_training
from qlora.model_source import ModelSource
from qlora.prepare import PreparedDataset, open_prepared
from qlora.processes import die_with_parent
from qlora.stages import StartingAdapter
from qlora.stop import RunInterrupted, graceful_stop
from qlora.tokenizer import setup_tokenizer
from qlora.train import save_training_outcome, train_run

log = logging.getLogger("qlora.train")


@record  # a failure is written to torchrun's error file, so the flow can name the rank and its error
def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # torchrun's child: never outlive it
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    # torchrun forwards the flow's stop as SIGTERM; every rank stops at the same step (qlora.train.StopAtNextStep)
    return run_rank((argv or sys.argv[1:])[0], graceful_stop, int(os.environ.get("LOCAL_RANK", "0")))


def run_rank(spec_path: str, stop_context, cuda_device: int | None = None) -> int:
    """One rank's training, as torchrun's processes and Ray Train's workers (qlora/ray_launch.py) run it: the
    torch.distributed environment is set up by the launcher. `stop_context(grace_s)`: how this process learns of a
    graceful stop (signals under torchrun, a file under Ray). `cuda_device`: this rank's GPU on a GPU run."""
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    cfg = load_pipeline_config(spec["config"])
    run_dir = Path(spec["run_dir"])
    with stop_context(cfg.training.stop_grace_s):
        try:
            return _train(spec, cfg, run_dir, rank, cuda_device)
        except RunInterrupted as stopped:
            if rank == 0:
                record = {"signal": stopped.signal_name, "step": stopped.step, "checkpoint": stopped.checkpoint}
                write_text_atomic(run_dir / STOPPED_NAME, json.dumps(record))
            log.info("%s", stopped)
            return stopped.exit_code


def _train(spec: dict, cfg, run_dir: Path, rank: int, cuda_device: int | None) -> int:
    src = spec["source"]
    source = ModelSource(ModelConfig(**src["model"]), src["path"], src["description"], src["digest"], src["gguf_file"])
    data = open_prepared(PreparedDataset(**spec["prepared"]), cfg.data)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, needs_chat_template=False)
    device = spec["device"]
    if device == "cuda":
        import torch

        torch.cuda.set_device(cuda_device or 0)  # device_map {"": "cuda"} then means this process's GPU
    model = load_base_for_training(source, cfg, device)
    starting = StartingAdapter(**spec["starting"]) if spec.get("starting") else None
    result = train_run(model, data, tokenizer, cfg, device, str(run_dir), spec["fingerprint"], log, starting=starting)
    peaks_mib = gather_per_rank(result.metrics["train_peak_memory_mib"])
    if rank == 0:
        log.info("peak memory per rank (MiB): %s", ", ".join(f"{p:.0f}" for p in peaks_mib))
        result.metrics["train_peak_memory_mib_max_rank"] = max(peaks_mib)
        # FSDP: the adapter gathered from the shards, saved as one ordinary PEFT adapter
        extra = {"peak_memory_mib_per_rank": peaks_mib, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
        save_training_outcome(result, run_dir, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
