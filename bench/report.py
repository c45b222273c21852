"""The bench's report: the environment it ran in, and the markdown table of the variants (bench.md)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess

import torch

from bench.models import is_moe
from bench.variants import VariantResult


def environment(device: str) -> dict:
    import bitsandbytes
    import peft
    import transformers
    import trl

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        env["liger_kernel"] = version("liger-kernel")
    except ImportError:
        env["liger_kernel"] = None
    if device == "cuda":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
    return env


def ratio(a: VariantResult | None, b: VariantResult | None) -> float | None:
    if not a or not b or not a.tokens_per_s or not b.tokens_per_s:
        return None
    return a.tokens_per_s / b.tokens_per_s


def weights_cell(v: dict) -> str:
    """'loaded / expected (ratio)' of a variant's 4-bit weights, in GiB; the expected size alone off CUDA."""
    size = v.get("four_bit_size_bytes")
    if not size:
        return "n/a"
    if not v.get("weights_bytes"):
        return f"n/a / {size / 2**30:.3g}"
    return f"{v['weights_bytes'] / 2**30:.3g} / {size / 2**30:.3g} ({v['weights_vs_four_bit']:.2f}x)"


def markdown_table(report: dict) -> str:
    moe = is_moe(report.get("architecture") or {})
    lines = [
        f"Model {report['model']} (random weights), data {report['data']}, device {report['environment']['device']}; "
        f"{report['timed_steps']} timed steps after {report['warmup_steps']} warm-up steps"
        + (
            f"; {report['num_processes']} processes ({report['strategy']}): tokens/s and tokens/step are totals, "
            "peak memory the highest process's (per process in bench.json)."
            if report.get("num_processes", 1) > 1
            else "."
        ),
        "",
        "| variant | real tokens/s | tokens/step | step s | peak mem GiB | MFU | first losses "
        "| vs recipe | vs trl_best |" + (" weights GiB / 4-bit size GiB |" if moe else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |" + (" ---: |" if moe else ""),
    ]
    by_name = {v["name"]: v for v in report["variants"]}
    for v in report["variants"]:
        if v["error"] or v.get("skipped"):
            lines.append(f"| {v['name']} | {v['error'] or 'skipped: ' + v['skipped']} | | | | | | | |" + moe * " |")
            continue
        mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "n/a"
        peak = "n/a" if v["peak_memory_gib"] is None else f"{v['peak_memory_gib']:.2f}"
        ratios = []
        for base in ("recipe", "trl_best"):
            b = by_name.get(base)
            r = v["tokens_per_s"] / b["tokens_per_s"] if b and not b["error"] and b["tokens_per_s"] else None
            ratios.append(f"{r:.2f}x" if r and v["name"] != base else "")
        lines.append(
            f"| {v['name']} | {v['tokens_per_s']:,.0f} | {v['tokens_per_step']:,.0f} | {v['step_time_s']:.3f} | "
            f"{peak} | {mfu} | {', '.join(f'{x:.3f}' for x in v['first_losses'])} | "
            f"{ratios[0]} | {ratios[1]} |" + (f" {weights_cell(v)} |" if moe else "")
        )
    finals = {v["name"]: v["final_loss"] for v in report["variants"] if v["final_loss"] is not None}
    if report["data"] == "bundled" and finals:
        shown = ", ".join(f"{k} {x:.4f}" for k, x in finals.items())
        lines += ["", f"Final loss (mean of the last 10% of steps): {shown}"]
        if "trl_best" in finals and "project" in finals:
            rel = (finals["project"] - finals["trl_best"]) / finals["trl_best"]
            lines.append(f"project vs trl_best final loss: {100 * rel:+.2f}%")
    if moe:
        lines += [
            "",
            "Weights: torch.cuda.memory_allocated() growth over the 4-bit load / the size the parameters' shapes "
            "give (4-bit matrices incl. the fused experts at 0.5 byte, their quantization state, 16-bit embeddings, "
            "head, norms, router); 1.00x = every expert in 4 bits.",
        ]
    return "\n".join(lines) + "\n"
