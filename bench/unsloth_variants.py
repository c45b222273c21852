"""The `unsloth` / `unsloth_lean` variants: bench/unsloth_worker.py in a process of its own, on an Unsloth
environment, measured as the other variants are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.flops import architecture_params, attention_width, flops_per_token, peak_tflops
from bench.settings import UNSLOTH_SITE_ENV, BenchConfig
from bench.variants import VariantResult, world_size


def run_unsloth(name: str, cfg: BenchConfig, model_dir: Path, tokenizer, rows, device: str, arch, matmul_tflops):
    """The unsloth variants: bench/unsloth_worker.py in a process of its own, with the Unsloth environment's
    packages in place of this project's (Unsloth pins older transformers and TRL; it is never a dependency here).
    Never raises: a model Unsloth cannot load or wrap (a family it does not support) is skipped with Unsloth's
    reason, any other failure is the variant's error, and the bench goes on."""
    site = cfg.unsloth_site or os.environ.get(UNSLOTH_SITE_ENV)
    if not (site or cfg.unsloth_python):
        return VariantResult(
            name=name,
            settings={},
            skipped=f"no Unsloth environment: pass --unsloth-site DIR (or set {UNSLOTH_SITE_ENV}); "
            "../shared/gpu/unsloth/build-unsloth-site.sh builds one",
        )
    if device != "cuda":
        return VariantResult(name=name, settings={}, skipped="Unsloth trains on CUDA only")
    if world_size() > 1:
        return VariantResult(name=name, settings={}, skipped="measured on one GPU only")
    try:
        return _run_unsloth_worker(name, cfg, site, model_dir, tokenizer, rows, device, arch, matmul_tflops)
    except Exception as exc:  # e.g. no such interpreter: the variant's error, not the bench's end
        return VariantResult(name=name, settings={}, error=f"{type(exc).__name__}: {exc}"[:300])


def _run_unsloth_worker(name, cfg: BenchConfig, site, model_dir: Path, tokenizer, rows, device, arch, matmul_tflops):
    if not (model_dir / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(model_dir)  # Unsloth loads the tokenizer from the model folder
    work = Path(tempfile.mkdtemp(prefix=f"qlora-bench-{name}-"))
    batch_rows = max(1, cfg.tokens_per_step // cfg.seq_len)
    spec = {
        "model_dir": str(model_dir.resolve()),
        "rows_file": str(work / "rows.json"),
        "output_dir": str(work / "out"),
        "seq_len": cfg.seq_len,
        "batch_rows": batch_rows,
        "steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "lean": name == "unsloth_lean",
        "r": 16,
        "alpha": 32,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site:
        env["PYTHONPATH"] = site
    worker = Path(__file__).with_name("unsloth_worker.py")
    try:
        (work / "rows.json").write_text(json.dumps(rows))
        (work / "spec.json").write_text(json.dumps(spec))
        cmd = [cfg.unsloth_python or sys.executable, str(worker), str(work / "spec.json")]
        found, unsupported, code = read_worker(cmd, env, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if unsupported is not None:
        return VariantResult(
            name=name, settings={}, skipped=f"Unsloth cannot run {arch.get('model_type', 'this model')}: {unsupported}"
        )
    if found is None:
        return VariantResult(name=name, settings=spec, error=f"the Unsloth process ended with code {code}")
    settings = {k: spec[k] for k in ("seq_len", "batch_rows", "lean", "r", "alpha")} | {"versions": found["versions"]}
    result = VariantResult(name=name, settings=settings)
    result.tokens_per_s, result.step_time_s = found["tokens_per_s"], found["step_time_s"]
    result.tokens_per_step = found["tokens_per_step"]
    result.peak_memory_gib, result.peak_reserved_gib = found["peak_memory_gib"], found["peak_reserved_gib"]
    frozen, lora = architecture_params(arch, 16)
    fpt = flops_per_token(frozen, lora, arch["num_hidden_layers"], attention_width(arch), [len(r) for r in rows])
    if peak_tflops(device):
        result.mfu = result.tokens_per_s * fpt / (peak_tflops(device) * 1e12)
    if matmul_tflops:
        result.mfu_of_measured_matmul = result.tokens_per_s * fpt / (matmul_tflops * 1e12)
    result.loss_history = list(enumerate(found["losses"], start=1))
    result.first_losses = [round(x, 4) for x in found["losses"][:5]]
    return result


def read_worker(cmd: list[str], env: dict, name: str) -> tuple[dict | None, str | None, int]:
    """Run the Unsloth worker, echoing its output; (its RESULT_JSON, the reason of its UNSUPPORTED_JSON: Unsloth
    could not load or wrap the model, its exit code)."""
    found = unsupported = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("RESULT_JSON "):
            found = json.loads(line.removeprefix("RESULT_JSON "))
        elif line.startswith("UNSUPPORTED_JSON "):
            unsupported = str(json.loads(line.removeprefix("UNSUPPORTED_JSON ")).get("reason", ""))[:300]
        else:
            print(f"[{name}] {line.rstrip()}"[:400], file=sys.stderr, flush=True)
    return found, unsupported, proc.wait()
