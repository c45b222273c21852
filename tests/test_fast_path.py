"""The fast training path: packed documents never see each other, the fused LoRA forward computes what peft's
does, the schema's switches are checked, and the benchmark's recipe variant is the shipped recipe config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline_config.loading import CONFIG_DIR, ConfigError, load_pipeline_config
from qlora.model import build_bnb_config, build_lora_config, load_quantized_model
from qlora.model_source import resolve_model_source

REPO = Path(__file__).resolve().parents[1]


def _peft_model(model_dir: Path, tmp_path: Path, device: str = "cpu", compute_dtype: str = "float32"):
    from peft import get_peft_model

    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(model_dir, tmp_path)
    raw["quantization"]["compute_dtype"] = compute_dtype
    raw["training"]["device"] = device
    cfg = load_pipeline_config(raw)
    model = load_quantized_model(resolve_model_source(cfg.model), cfg.quantization, device, cfg.training.attention)
    lora = build_lora_config(cfg.lora)
    lora.init_lora_weights = False  # random B: the adapter changes the output
    torch.manual_seed(3)
    return get_peft_model(model, lora), cfg


def _documents(tokenizer, n: int = 6) -> list[list[int]]:
    import random

    from qlora.bundled_data import make_order_row

    rng = random.Random(7)
    return [
        list(tokenizer.apply_chat_template(make_order_row(rng)["messages"], tokenize=True, return_dict=False))
        for _ in range(n)
    ]


def test_packed_loss_equals_per_document_loss(tiny_llama_dir, tmp_path):
    """Padding-free packing (the collator SFTTrainer uses with bfd packing) gives each document the loss it has
    alone; the same row with positions that run on (documents attending to each other) does not."""
    from bench.packing import packed_vs_unpacked_loss

    model, _ = _peft_model(tiny_llama_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    docs = _documents(tokenizer)
    check = packed_vs_unpacked_loss(model, docs, tokenizer.pad_token_id, "cpu")
    assert check["abs_diff"] < 1e-3, check

    # Control: the same concatenation as one ordinary sequence leaks context across documents.
    ids = torch.tensor([sum(docs, [])])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    starts = set(torch.tensor([len(d) for d in docs]).cumsum(0).tolist())
    keep = torch.tensor([i + 1 not in starts for i in range(ids.shape[1] - 1)])
    leaky = torch.nn.functional.cross_entropy(logits[0, :-1][keep], ids[0, 1:][keep]).item()
    assert abs(leaky - check["per_document"]) > 1e-2, (leaky, check)


def test_fused_lora_forward_matches_peft(tiny_llama_dir, tmp_path):
    from qlora.integrations.fused_lora import fuse_lora_layers

    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for fuse in (False, True):
        model, _ = _peft_model(tiny_llama_dir, tmp_path)
        model.train()
        if fuse:
            assert fuse_lora_layers(model) == 14  # 7 linears x 2 layers
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), grads))
        if fuse:  # the base model (adapter disabled) still runs peft's own path
            with model.disable_adapter(), torch.no_grad():
                base_fused = model(input_ids=ids).logits
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)
    model, _ = _peft_model(tiny_llama_dir, tmp_path)
    model.train()  # same mode: bitsandbytes' CPU eval mode repacks the 4-bit weights for another kernel
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(base_fused, model(input_ids=ids).logits)


def test_checkpoint_first_layers_only(tiny_llama_dir, tmp_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora.integrations.trainer import CheckpointFirstLayers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.gradient_checkpointing_enable()

    def flags():
        return [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]

    CheckpointFirstLayers(2).on_train_begin(None, None, None, model=model)
    assert flags() == [True, True]
    CheckpointFirstLayers(None).on_train_begin(None, None, None, model=model)  # default: all but the last
    assert flags() == [True, False]
    CheckpointFirstLayers(None, offloading=True).on_train_begin(None, None, None, model=model)  # offloaded: all
    assert flags() == [True, True]


def test_compile_layers_refuses_checkpointing_and_liger(tiny_config_file):
    with pytest.raises(ConfigError, match="compile_layers and gradient_checkpointing are both true"):
        load_pipeline_config(tiny_config_file, ["training.compile_layers=true", "training.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="compile_layers and liger_kernels true"):
        load_pipeline_config(tiny_config_file, ["training.compile_layers=true", "training.liger_kernels=true"])


def test_fast_switches_are_validated(tiny_config_file):
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers is set but gradient_checkpointing is false"):
        load_pipeline_config(tiny_config_file, ["training.gradient_checkpointing_layers=4"])
    # CUDA-only kernels asked for explicitly on a CPU run
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(tiny_config_file, ["training.attention=varlen_flash", "training.liger_kernels=true"])
    assert "varlen_flash' needs CUDA" in str(err.value) and "liger_kernels needs CUDA" in str(err.value)
    cfg = load_pipeline_config(tiny_config_file)
    assert cfg.training.packing and cfg.training.fused_lora and not cfg.lora.upcast_base_to_fp32


def test_bench_recipe_variant_is_the_shipped_recipe(tmp_path):
    """The benchmark's 'original recipe' variant is pipeline_config/llama2-7b-chat-guanaco.yaml: only the model, the
    data and the step/logging/saving settings of the bench differ."""
    from bench.settings import BenchConfig
    from bench.variants import recipe_config

    cfg = load_pipeline_config(CONFIG_DIR / "llama2-7b-chat-guanaco.yaml")
    bench = recipe_config(BenchConfig(), tmp_path, str(tmp_path / "out"), "cuda")
    bench_only = {"model.name_or_path", "data.source", "training.output_dir", "training.max_steps"}
    bench_only |= {"training.logging_steps", "training.save_steps", "training.resume", "training.seed"}
    shipped, benched = cfg.to_flat_dict(), bench.to_flat_dict()
    assert {k for k in shipped if shipped[k] != benched[k]} <= bench_only
    t, q, lo = bench.training, bench.quantization, bench.lora
    assert (q.quant_type, q.compute_dtype, q.double_quant) == ("nf4", "float16", False)
    assert (lo.r, lo.alpha, lo.dropout, lo.upcast_base_to_fp32) == (64, 16, 0.1, True)
    assert lo.target_modules == ["q_proj", "v_proj"]  # peft's default for Llama when the recipe names none
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing) == (4, 1, True)
    assert (t.max_grad_norm, t.weight_decay, t.lr_scheduler_type) == (0.3, 0.001, "cosine")
    assert t.optim == "paged_adamw_32bit"
    assert (t.warmup_ratio, t.max_seq_length, t.group_by_length, t.packing) == (0.03, 1024, True, False)
    assert (t.fp16, t.bf16, t.learning_rate) == (False, False, 2e-4)
    # the recipe predates the fast path: none of its levers
    assert (t.attention, t.liger_kernels, t.fused_lora) == ("sdpa", False, False)
    assert (t.metrics_on_device, t.activation_offloading, t.compile_layers) == (False, False, False)
    assert recipe_config(BenchConfig(), tmp_path, str(tmp_path), "cpu").training.optim == "adamw_torch"


def _run_bench(*args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    """`qlora-flow bench ARGS`, run from the repository root with its output captured as text."""
    command = [sys.executable, "-m", "flows.cli", "bench", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_bench_smoke_cpu(tmp_path):
    """What CI runs: `qlora-flow bench --model tiny --device cpu --steps 3` writes a full report."""
    out = tmp_path / "bench"
    proc = _run_bench(
        *["--model", "tiny", "--device", "cpu", "--steps", "3"],
        *["--model-dir", str(tmp_path / "models"), "--out-dir", str(out)],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["recipe", "trl_best", "project", "project_lean", "unsloth", "unsloth_lean"]
    # without an Unsloth environment its variants are skipped with one line each, and the run still succeeds
    for v in report["variants"][4:]:
        assert v["skipped"].startswith("no Unsloth environment: pass --unsloth-site") and v["error"] is None
    assert proc.stderr.count("skipped (no Unsloth environment") == 2
    for v in report["variants"][:4]:
        assert v["error"] is None and v["tokens_per_s"] > 0 and v["tokens_per_step"] > 0, v
        assert len(v["first_losses"]) >= 3 and all(9 < x < 12 for x in v["first_losses"])  # ~ln(32000) = 10.4
    # packed variants train on full rows; the recipe pads batches of 4 rows up to 1024 tokens
    assert report["variants"][2]["tokens_per_step"] > 1800
    expected = {f"{a}/{b}" for a in ("project", "project_lean") for b in ("recipe", "trl_best")}
    assert set(report["ratios"]) == expected
    table = (out / "bench.md").read_text()
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][2:]  # past header + rule
    assert rows == ["| recipe", "| trl_best", "| project", "| project_lean", "| unsloth", "| unsloth_lean"]


@pytest.mark.slow
def test_bench_max_context_trains_one_document_per_length_on_one_loaded_model(tmp_path):
    """`bench --max-context`: one optimizer step on one document of each length, the lean path, the 4-bit model
    loaded once and its LoRA layers removed after each length; the report gives the memory curve."""
    out = tmp_path / "bench"
    proc = _run_bench(
        *["--model", "tiny", "--device", "cpu", "--max-context"],
        *["--context-lengths", "1024,256", "--model-dir", str(tmp_path / "models"), "--out-dir", str(out)],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "max-context.json").read_text())
    assert [r["tokens"] for r in report["lengths"]] == [256, 1024]  # ascending
    for row in report["lengths"]:
        assert row["result"] == "ok" and row["step_s"] > 0 and row["host_peak_rss_gib"] > 0, row
        assert 9 < row["loss"] < 12  # one step on random ids: ~ln(32000)
    assert report["longest_document_tokens"] == 1024
    assert "| 1,024 | ok |" in (out / "max-context.md").read_text()
    bad = _run_bench("--max-context", "--context-lengths", "128k", timeout=120)
    assert bad.returncode == 2 and "--context-lengths '128k'" in bad.stderr


@pytest.mark.slow
def test_bench_on_two_processes_reports_the_total_of_both(tmp_path):
    """`bench --num-processes 2` re-launches itself through torchrun (gloo on the CPU): both processes train with the
    per-process batch, only rank 0 writes the report, and tokens per step is the total of both."""
    out = tmp_path / "bench"
    args = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--variants", "project", "--num-processes", "2"]
    proc = _run_bench(*args, "--model-dir", str(tmp_path / "models"), "--out-dir", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node 2" in proc.stderr
    report = json.loads((out / "bench.json").read_text())
    assert (report["num_processes"], report["strategy"]) == (2, "ddp")
    (variant,) = report["variants"]
    assert variant["error"] is None and variant["tokens_per_s"] > 0
    assert variant["tokens_per_step"] > 2 * 1800  # two processes, each ~2,048 packed tokens per step
    assert len(variant["settings"]["peak_memory_gib_per_rank"]) == 2
    assert "2 processes (ddp)" in (out / "bench.md").read_text()


def test_bench_fsdp_measures_only_the_project_path(tmp_path):
    from bench.run import run_bench
    from bench.settings import BenchConfig
    from qlora.errors import PipelineInputError

    cfg = BenchConfig(model="tiny", device="cpu", num_processes=2, strategy="fsdp", variants=("project", "recipe"))
    with pytest.raises(PipelineInputError, match=r"drop \['recipe'\] from --variants"):
        run_bench(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_attention_matches_sdpa_per_document(tiny_llama_dir, tmp_path):
    """On the GPU, the varlen flash path on a packed row equals each document run alone (bf16 tolerance)."""
    from bench.packing import packed_vs_unpacked_loss
    from qlora.integrations.attention import VARLEN_ATTENTION, packed_training_attention, varlen_available

    assert varlen_available()
    model, cfg = _peft_model(tiny_llama_dir, tmp_path, device="cuda", compute_dtype="bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    docs = _documents(tokenizer)
    reference = packed_vs_unpacked_loss(model, docs, tokenizer.pad_token_id, "cuda")["per_document"]  # SDPA alone
    with packed_training_attention(model, VARLEN_ATTENTION, padding_free=True):
        assert model.config._attn_implementation == VARLEN_ATTENTION
        packed = packed_vs_unpacked_loss(model, docs, tokenizer.pad_token_id, "cuda")["packed"]
    assert model.config._attn_implementation == "sdpa"
    assert abs(packed - reference) < 1e-2, (packed, reference)  # bf16 activations
    assert build_bnb_config(cfg.quantization).bnb_4bit_compute_dtype == torch.bfloat16
