"""`qlora-flow bench --max-context`: the longest single document the lean path trains on, with the memory curve.

    qlora-flow bench --max-context --model llama2-7b                      (GPU; bench-results/max-context.{json,md})
    qlora-flow bench --max-context --model llama2-7b --num-layers 4 --context-lengths 131072,262144,393216
    qlora-flow bench --max-context --model tiny --device cpu --context-lengths 256,512      (CI smoke run)

For each length, in ascending order, one optimizer step on ONE document of that many tokens (synthetic ids; a
micro-batch of one padding-free row), through the project's training path with the lean switch
(`training.gradient_checkpointing: true`) and, on CUDA, `training.activation_offloading: true`, which moves the
checkpointed layer inputs to pinned host memory. The 4-bit model is loaded once and reused (the LoRA layers are
removed again after each length). The search stops at the first length that runs out of GPU memory.

Reported per length: peak GPU memory allocated and reserved (`torch.cuda.max_memory_*`, model included), the
process's peak resident host memory during the step (sampled), the step's wall time and tokens/s.

With `--num-layers L` only L of the architecture's decoder layers are built: each layer's activation peak does not
depend on the depth, and the checkpointed inputs of all layers wait on the host, so the GPU peak of the full depth
is the measured one plus the 4-bit weights of the layers left out (printed as `weights_left_out_gib`); the step
time grows with the depth.

The CUDA allocator runs with `expandable_segments:True` (set before CUDA starts, unless PYTORCH_CUDA_ALLOC_CONF is
already set): at these sizes fixed segments fragment into out-of-memory errors with gigabytes free.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.flops import layer_params
from bench.memory import free_accelerator_memory
from bench.models import architecture, build_model_dir, synthetic_tokenizer
from bench.settings import BenchConfig
from bench.variants import project_config
from qlora.files import write_text_atomic

DEFAULT_LENGTHS = (32768, 65536, 131072, 196608, 262144, 327680, 393216, 458752, 524288)


class OneStepClock(TrainerCallback):
    """Wall time of the first optimizer step (device-synchronised) and the host's peak RSS during it."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds, self.host_peak = device, 0.0, 0
        self._t0 = 0.0
        self._sampling = False
        self._thread: threading.Thread | None = None

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while self._sampling:
            self.host_peak = max(self.host_peak, proc.memory_info().rss)
            time.sleep(0.05)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._sync()
            self._sampling = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self._sync()
            self.seconds = time.perf_counter() - self._t0
            self.stop()

    def stop(self) -> None:
        self._sampling = False
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def use_expandable_segments() -> None:
    """Before CUDA starts: let the allocator grow segments instead of fragmenting fixed ones."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def weights_gib(arch: dict, layers: int) -> float:
    """4-bit weights (NF4, double quant: ~0.51 bytes per weight) of `layers` decoder layers: attention, MLP and
    every expert of a mixture-of-experts layer (the router stays in 16 bits)."""
    four_bit = sixteen_bit = 0
    for layer in range(layers):
        shapes = layer_params(arch, layer)
        four_bit += sum(i * o for i, o in shapes["attention"] + shapes["mlp"]) + shapes["experts"]
        sixteen_bit += sum(i * o for i, o in shapes["router"])
    return (four_bit * 0.5156 + sixteen_bit * 2) / 2**30


def train_one_document(cfg: BenchConfig, model, model_dir: Path, tokenizer, length: int, device: str) -> dict:
    """One optimizer step on one `length`-token document; returns the row of the memory curve."""
    from datasets import Dataset

    from qlora.data import DatasetSplits
    from qlora.train import train_adapter

    extra = ["training.gradient_checkpointing=true"]
    if device == "cuda":
        extra.append("training.activation_offloading=true")
    step_cfg = replace(cfg, seq_len=length, tokens_per_step=length, project_micro_batch_tokens=length)
    step_cfg = replace(step_cfg, warmup_steps=0, steps=1, profile_steps=0)
    out_dir = tempfile.mkdtemp(prefix="qlora-bench-context-")
    pcfg = project_config(step_cfg, model_dir, out_dir, device, tuple(extra))
    import numpy as np

    ids = np.random.default_rng(cfg.seed).integers(3, len(tokenizer), size=length).tolist()
    dataset = Dataset.from_dict({"input_ids": [ids]})
    splits = DatasetSplits(train=dataset, eval=dataset, kind="text", digest="bench", source="bench")
    clock = OneStepClock(device)
    free_accelerator_memory()
    row = {"tokens": length}
    try:
        result = train_adapter(
            model, splits, tokenizer, pcfg.lora, pcfg.training, device, extra_callbacks=[clock], disable_tqdm=True
        )
        result.model.unload()  # the base model again, for the next length
        row |= {"result": "ok", "step_s": round(clock.seconds, 2), "tokens_per_s": round(length / clock.seconds, 1)}
        row["loss"] = round(result.loss_history[0][1], 4) if result.loss_history else None
        del result
    except torch.cuda.OutOfMemoryError as exc:  # train_adapter has removed the LoRA layers again
        row |= {"result": "out of memory", "error": str(exc).splitlines()[0][:200]}
    except Exception as exc:  # e.g. host memory for the offloaded activations: reported, and the search ends
        row |= {"result": f"failed: {type(exc).__name__}", "error": str(exc).splitlines()[0][:200] if str(exc) else ""}
    finally:
        clock.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
    if device == "cuda":
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    row["host_peak_rss_gib"] = round(clock.host_peak / 2**30, 2)
    free_accelerator_memory()
    return row


def run_max_context(cfg: BenchConfig, lengths: tuple[int, ...]) -> dict:
    """Ascending lengths until the first out-of-memory; writes max-context.json/.md under cfg.out_dir."""
    from qlora.integrations.liger import restore_llama_rope
    from qlora.model import load_base_for_training, pick_device
    from qlora.model_source import resolve_model_source

    device = pick_device(cfg.device)
    arch = architecture(cfg)
    tokenizer = synthetic_tokenizer(32000)
    model_dir = build_model_dir(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, device)
    rows: list[dict] = []
    report = {}
    with restore_llama_rope():
        first = project_config(cfg, model_dir, tempfile.gettempdir(), device, ("training.gradient_checkpointing=true",))
        model = load_base_for_training(resolve_model_source(first.model), first, device)
        for length in sorted(lengths):
            print(f"[bench] one document of {length:,} tokens ...", file=sys.stderr, flush=True)
            row = train_one_document(cfg, model, model_dir, tokenizer, length, device)
            print(f"[bench] {row}", file=sys.stderr, flush=True)
            rows.append(row)
            report = write_report(cfg, arch, device, rows)  # after every length: a long search keeps what it found
            if row["result"] != "ok":
                break
    return report


def write_report(cfg: BenchConfig, arch: dict, device: str, rows: list[dict]) -> dict:
    fits = [r["tokens"] for r in rows if r["result"] == "ok"]
    left_out = arch_layers_left_out(cfg)
    report = {
        "command": "qlora-flow " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv else None,
        "model": cfg.model,
        "architecture": arch,
        "layers_built": arch["num_hidden_layers"],
        "weights_left_out_gib": round(weights_gib(arch, left_out), 2) if left_out else 0.0,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") if device == "cuda" else None,
        "settings": "lean path (gradient_checkpointing)" + (" + activation_offloading" if device == "cuda" else ""),
        "lengths": rows,
        "longest_document_tokens": max(fits) if fits else 0,
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("max-context.json", json.dumps(report, indent=1)), ("max-context.md", markdown(report))):
        write_text_atomic(out / name, text)
    return report


def arch_layers_left_out(cfg: BenchConfig) -> int:
    from bench.settings import ARCHITECTURES

    full = ARCHITECTURES[cfg.model]["num_hidden_layers"]
    return full - cfg.num_layers if cfg.num_layers else 0


def markdown(report: dict) -> str:
    depth = report["layers_built"]
    lines = [
        f"Longest single document, {report['model']} ({depth} decoder layers built), {report['device']}, "
        f"{report['settings']}; allocator {report['allocator']}.",
        "",
        "| tokens in one document | result | peak GiB allocated | peak GiB reserved | host RSS GiB | step s "
        "| tokens/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["lengths"]:
        lines.append(
            f"| {r['tokens']:,} | {r['result']} | {r.get('peak_allocated_gib', 'n/a')} | "
            f"{r.get('peak_reserved_gib', 'n/a')} | {r['host_peak_rss_gib']} | {r.get('step_s', '')} | "
            f"{r.get('tokens_per_s', '')} |"
        )
    lines += ["", f"Longest that trained: {report['longest_document_tokens']:,} tokens."]
    if report["weights_left_out_gib"]:
        lines.append(
            f"The {report['architecture']['num_hidden_layers']} layers built leave out "
            f"{report['weights_left_out_gib']} GiB of 4-bit weights that the full depth adds to every GPU peak."
        )
    return "\n".join(lines) + "\n"
