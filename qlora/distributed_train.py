"""The training entry point each process of a distributed run executes (qlora/distributed.py launches it):

    python -m torch.distributed.run --nproc-per-node N ... -m qlora.distributed_train <run folder>/launch-spec.json

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

from pipeline_config.schema import ModelConfig, load_pipeline_config
from qlora.distributed import RESULT_NAME, TRAINED_ADAPTER_DIRNAME, gather_per_rank
from qlora.files import atomic_folder, write_text_atomic
from qlora.model import load_base_for_training
from qlora.model_source import ModelSource
from qlora.prepare import PreparedDataset, open_prepared
from qlora.tokenizer import setup_tokenizer
from qlora.train import save_trained_adapter, train_run

log = logging.getLogger("qlora.train")


@record  # a failure is written to torchrun's error file, so the flow can name the rank and its error
def main(argv: list[str] | None = None) -> int:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    cfg = load_pipeline_config(spec["config"])
    src = spec["source"]
    source = ModelSource(ModelConfig(**src["model"]), src["path"], src["description"], src["digest"], src["gguf_file"])
    data = open_prepared(PreparedDataset(**spec["prepared"]), cfg.data)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, needs_chat_template=False)
    device = spec["device"]
    if device == "cuda":
        import torch

        torch.cuda.set_device(local_rank)  # device_map {"": "cuda"} then means this process's GPU
    model = load_base_for_training(source, cfg, device)
    run_dir = Path(spec["run_dir"])
    result = train_run(model, data, tokenizer, cfg, device, str(run_dir), spec["fingerprint"], log)
    peaks_mib = gather_per_rank(result.metrics["train_peak_memory_mib"])
    if rank == 0:
        with atomic_folder(run_dir / TRAINED_ADAPTER_DIRNAME, replace=True) as tmp:
            # FSDP: the adapter gathered from the shards, saved as one ordinary PEFT adapter
            save_trained_adapter(result, tmp)
        log.info("peak memory per rank (MiB): %s", ", ".join(f"{p:.0f}" for p in peaks_mib))
        summary = {
            "metrics": result.metrics | {"train_peak_memory_mib_max_rank": max(peaks_mib)},
            "peak_memory_mib_per_rank": peaks_mib,
            "loss_history": result.loss_history,
            "resumed_from": result.resumed_from,
            "adapter_dtype": result.adapter_dtype,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        write_text_atomic(run_dir / RESULT_NAME, json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
