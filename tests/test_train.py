"""Training on the tiny model: the loss goes down, and every training row ends with EOS."""

from __future__ import annotations

import pytest
import torch

from pipeline_config.loading import load_pipeline_config
from qlora.data import load_dataset_splits
from qlora.evaluate import eval_loss, scored_examples
from qlora.model import load_quantized_model
from qlora.model_source import resolve_model_source
from qlora.tokenizer import setup_tokenizer
from qlora.train import train_adapter

pytestmark = pytest.mark.slow


def test_training_lowers_loss_and_rows_end_with_eos(tiny_config_file):
    # A random 2-layer model learns little in a few steps, so it is asked to fit 16 rows, scored on those rows.
    cfg = load_pipeline_config(
        tiny_config_file, ["training.max_steps=30", "training.learning_rate=2e-2", "data.max_train_rows=16"]
    )
    data = load_dataset_splits(cfg.data)
    data.eval = data.train
    source = resolve_model_source(cfg.model)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, data.is_conversational)
    model = load_quantized_model(source, cfg.quantization, "cpu")
    examples = scored_examples(data, tokenizer, max_rows=16, max_len=cfg.training.max_seq_length)
    before = eval_loss(model, tokenizer, examples, batch_size=8)

    result = train_adapter(model, data, tokenizer, cfg.lora, cfg.training, device="cpu")

    after = eval_loss(result.model, tokenizer, examples, batch_size=8)
    assert after < before - 2.0, (before, after)  # measured: 12.6 -> 9.1 nats per answer token
    losses = [loss for _, loss in result.loss_history]
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert result.metrics["train_tokens"] > 0 and result.metrics["train_tokens_per_s"] > 0
    # Every tokenized training row closes its answer with EOS (the chat template adds only a newline after it).
    eos = tokenizer.eos_token_id
    for ids in result.train_dataset["input_ids"]:
        tail = [t for t in ids if t != tokenizer.convert_tokens_to_ids("\u010a")][-1:]
        assert tail == [eos]


def test_fsdp_arguments_are_fsdp1_with_one_unit_per_decoder_layer_and_its_own_checkpointing():
    """The FSDP-QLoRA settings as accelerate receives them. FSDP1 is deprecated in transformers 5.24 (FSDP2 keeps
    4-bit weights out of sharding in places, see qlora/train.py): this breaks when an upgrade drops or changes it."""
    from pipeline_config.schema import TrainingConfig
    from qlora.train import build_sft_config

    cfg = TrainingConfig(gradient_checkpointing=True, optim="adamw_torch", device="cpu")
    args = build_sft_config(cfg, "cuda", "/tmp/unused", fsdp=True)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 1 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["reshard_after_forward"] == "full_shard" and plugin["use_orig_params"] is False
    assert plugin["activation_checkpointing"] is True and not args.gradient_checkpointing  # FSDP's, not the Trainer's
    assert plugin["cpu_ram_efficient_loading"] is True and plugin["sync_module_states"] is True
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert not build_sft_config(cfg, "cuda", "/tmp/unused").fsdp  # DDP / one process: no FSDP


def test_an_adapter_saved_from_gathered_weights_equals_the_ordinary_save(tiny_llama_dir, tmp_path):
    """FSDP saves the LoRA weights gathered from the shards through a meta-device PEFT model of the same
    architecture (save_trained_adapter): the folder must hold exactly what the live model's own save writes."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora.model import build_lora_config
    from qlora.train import TrainResult, save_trained_adapter

    cfg = load_pipeline_config({"model": {"name_or_path": str(tiny_llama_dir)}, "data": {"source": "bundled:orders"}})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), build_lora_config(cfg.lora))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make every tensor distinct
            param.data.normal_()
    gathered = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    save_trained_adapter(TrainResult(model=model, metrics={}), tmp_path / "ordinary")
    save_trained_adapter(TrainResult(model=model, metrics={}, adapter_state_dict=gathered), tmp_path / "gathered")
    ordinary = load_file(str(tmp_path / "ordinary" / "adapter_model.safetensors"))
    from_gathered = load_file(str(tmp_path / "gathered" / "adapter_model.safetensors"))
    assert ordinary.keys() == from_gathered.keys() and len(ordinary) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for key in ordinary:
        assert torch.equal(ordinary[key], from_gathered[key])


def test_metrics_on_device_read_nothing_back_inside_a_step_and_log_the_same_figures(tiny_config_file):
    """`training.metrics_on_device`: between a step's first micro-batch and its optimizer step, the trainer reads
    nothing back to the host (`.item()`, `.tolist()`, a tensor's truth value), while transformers' and TRL's own
    metric code reads several times per micro-batch. Loss, token count and TRL's metrics come out the same either way.
    Reads inside the model's forward are not counted: on the CPU, SDPA's packed-mask builder makes one (on CUDA the
    varlen kernel builds no mask)."""
    from transformers import TrainerCallback

    reads = {"inside": False, "count": 0, "forward": False}

    class Window(TrainerCallback):  # on_step_begin .. on_pre_optimizer_step: the micro-batches of one step
        def __init__(self):
            self.logs = []

        def on_step_begin(self, args, state, control, **kwargs):
            reads["inside"] = True

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            reads["inside"] = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    def counted(original):
        def read(self, *args, **kwargs):
            if reads["inside"] and not reads["forward"]:
                reads["count"] += 1
            return original(self, *args, **kwargs)

        return read

    cfg = load_pipeline_config(
        tiny_config_file,
        ["training.max_steps=4", "training.logging_steps=2", "training.gradient_accumulation_steps=2"],
    )
    data = load_dataset_splits(cfg.data)
    source = resolve_model_source(cfg.model)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, data.is_conversational)
    runs = {}
    patches = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__")}
    try:
        for name, original in patches.items():
            setattr(torch.Tensor, name, counted(original))
        for on_device in (True, False):
            training = cfg.training.model_copy(update={"metrics_on_device": on_device})
            model = load_quantized_model(source, cfg.quantization, "cpu")
            model.register_forward_pre_hook(lambda *_: reads.update(forward=True))
            model.register_forward_hook(lambda *_: reads.update(forward=False), always_call=True)
            window, reads["count"] = Window(), 0
            result = train_adapter(model, data, tokenizer, cfg.lora, training, "cpu", extra_callbacks=[window])
            runs[on_device] = (reads["count"], result, [log for log in window.logs if "loss" in log])
    finally:
        for name, original in patches.items():
            setattr(torch.Tensor, name, original)
    (reads_on, fast, fast_logs), (reads_off, plain, plain_logs) = runs[True], runs[False]
    assert reads_on == 0, reads_on
    assert reads_off >= 8, reads_off  # TRL: 2 metric reads, its token count and a comparison, per micro-batch
    assert fast.metrics["train_tokens"] == plain.metrics["train_tokens"] > 0
    assert [s for s, _ in fast.loss_history] == [s for s, _ in plain.loss_history] == [2, 4]
    for (_, a), (_, b) in zip(fast.loss_history, plain.loss_history, strict=True):
        assert abs(a - b) < 1e-5, (fast.loss_history, plain.loss_history)
    for a, b in zip(fast_logs, plain_logs, strict=True):
        assert a["num_tokens"] == b["num_tokens"] and a["num_input_tokens_seen"] == b["num_input_tokens_seen"]
        # token-weighted over the window here, a mean of per-micro-batch ratios in TRL: close, not equal
        assert abs(a["mean_token_accuracy"] - b["mean_token_accuracy"]) < 0.05, (a, b)
        assert abs(a["entropy"] - b["entropy"]) < 0.05 * b["entropy"], (a, b)


def test_compiled_decoder_layers_train_like_eager(tiny_config_file):
    """`training.compile_layers`: the same two optimizer steps through torch.compile'd decoder layers give the eager
    losses within 1e-3 (the 4-bit linears, peft's LoRA and the fused LoRA forward traced by dynamo); afterwards the
    layers are eager again, for evaluation and generation."""
    from torch._dynamo.utils import counters

    cfg = load_pipeline_config(tiny_config_file, ["training.max_steps=2", "training.logging_steps=1"])
    data = load_dataset_splits(cfg.data)
    source = resolve_model_source(cfg.model)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, data.is_conversational)
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        training = cfg.training.model_copy(update={"compile_layers": compiled})
        model = load_quantized_model(source, cfg.quantization, "cpu")
        result = train_adapter(model, data, tokenizer, cfg.lora, training, "cpu")
        losses[compiled] = [loss for _, loss in result.loss_history]
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # dynamo compiled something only when asked
        layers = [m for m in result.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert len(layers) == 2 and all(m._compiled_call_impl is None for m in layers)
    assert len(losses[True]) == 2
    for eager, fused in zip(losses[False], losses[True], strict=True):
        assert abs(eager - fused) < 1e-3, losses


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_the_adapter_trains_in_the_compute_dtype_of_a_float32_base_and_in_bf16_otherwise(
    tiny_config_file, compute_dtype
):
    """TRL casts a 4-bit model's LoRA weights to bf16; with a float32 compute dtype (a CPU without bf16 instructions,
    where bf16 matmuls are emulated) they go back to float32 (qlora/integrations/trainer.py), else TRL's bf16 stands.
    The saved adapter's dtype is what inference loads it in."""
    cfg = load_pipeline_config(
        tiny_config_file,
        ["training.max_steps=1", "data.max_train_rows=4", f"quantization.compute_dtype={compute_dtype}"],
    )
    data = load_dataset_splits(cfg.data)
    source = resolve_model_source(cfg.model)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, data.is_conversational)
    model = load_quantized_model(source, cfg.quantization, "cpu")
    result = train_adapter(model, data, tokenizer, cfg.lora, cfg.training, device="cpu")
    lora = {p.dtype for n, p in result.model.named_parameters() if "lora_" in n}
    expected = getattr(torch, compute_dtype)
    assert lora == {expected} and result.adapter_dtype == compute_dtype


def test_compute_dtype_auto_is_settled_for_the_machine_when_the_run_starts(monkeypatch):
    """quantization.compute_dtype auto: the mixed-precision dtype when training asks for one, else bf16 only where
    the CPU computes in it; the settled config (MLflow's params, the fingerprint, the registered version) says which."""
    from qlora import model as model_module
    from qlora.run_config import settle_run_config

    def settled(cpu_bf16: bool, **training) -> str:
        monkeypatch.setattr(model_module, "cpu_computes_bf16", lambda: cpu_bf16)
        raw = {"model": {"name_or_path": "x"}, "data": {"source": "bundled:orders"},
               "training": {"device": "cpu", **training}}  # fmt: skip
        return settle_run_config(load_pipeline_config(raw), None, None).quantization.compute_dtype

    assert settled(cpu_bf16=False) == "float32"
    assert settled(cpu_bf16=True) == "bfloat16"
    assert settled(cpu_bf16=False, bf16=True) == "bfloat16"
    raw = {
        "model": {"name_or_path": "x"},
        "data": {"source": "bundled:orders"},
        "quantization": {"compute_dtype": "float16"},
    }
    assert settle_run_config(load_pipeline_config(raw), None, None).quantization.compute_dtype == "float16"
