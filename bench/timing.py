"""Timing the steps of a variant: a Trainer callback around the timed steps, and a profile's kernel summary."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Times optimizer steps warmup+1 .. warmup+timed with device syncs; optionally profiles the steps after."""

    def __init__(self, warmup: int, timed: int, device: str, profile_steps: int = 0) -> None:
        self.warmup, self.timed, self.device, self.profile_steps = warmup, timed, device, profile_steps
        self.t0 = self.t1 = 0.0
        self.tokens0 = self.tokens1 = 0
        self.peak = self.reserved = 0
        self.profiler = None

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_steps and state.global_step == self.warmup + self.timed:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == self.warmup:
            self._sync()
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
        elif step == self.warmup + self.timed:
            self._sync()
            self.t1, self.tokens1 = time.perf_counter(), state.num_input_tokens_seen
            if self.device == "cuda":
                self.peak, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        elif self.profiler is not None and step == self.warmup + self.timed + self.profile_steps:
            self._sync()
            self.profiler.__exit__(None, None, None)


def summarize_profile(prof, top: int = 25) -> dict:
    """CUDA (or CPU) self time by kernel, grouped into categories."""
    from torch.autograd import DeviceType

    averages = prof.key_averages()
    # Kernels only (operator rows would count their kernels' time a second time).
    use_cuda = any(evt.device_type == DeviceType.CUDA for evt in averages)
    rows = []
    for evt in averages:
        if use_cuda and evt.device_type != DeviceType.CUDA:
            continue
        t = evt.self_device_time_total if use_cuda else evt.self_cpu_time_total
        if t > 0:
            rows.append((evt.key, t, evt.count))
    rows.sort(key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows) or 1.0
    categories = {
        "4-bit dequantize": ("dequant", "kdequant"),
        "attention": ("flash", "fmha", "attention", "attn", "sdpa"),
        "matmul (bf16 GEMM)": ("gemm", "gemv", "cutlass", "nvjet", "xmma", "matmul", "mm_", "addmm", "bmm"),
        "Liger / Triton": ("triton", "_rms", "swiglu", "rope", "liger"),
        "optimizer": ("adam", "multi_tensor", "foreach"),
        "loss / LM head": ("cross_entropy", "log_softmax", "logsumexp", "nll"),
        "copies / casts": ("copy", "cast", "to_copy", "convert", "cat"),
    }
    by_cat: dict[str, float] = {}
    for key, t, _ in rows:
        low = key.lower()
        cat = next((c for c, pats in categories.items() if any(p in low for p in pats)), "other elementwise")
        by_cat[cat] = by_cat.get(cat, 0.0) + t
    return {
        "clock": "device" if use_cuda else "cpu",
        "total_ms": total / 1000,
        "categories_pct": {k: round(100 * v / total, 1) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": k[:120], "ms": round(t / 1000, 2), "pct": round(100 * t / total, 1), "calls": n}
            for k, t, n in rows[:top]
        ],
    }
