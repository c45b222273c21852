"""The model families users fine-tune, each through the whole flow on the CPU: a tiny random model of the family
(built from its config here, no hub; widths multiples of 32 for bitsandbytes' CPU kernel) trains, its eval loss
drops below the base's, the saved adapter reloads and reproduces that eval loss, and it merges and generates.

The family's own needs are handled where each concern lives, not here: Gemma 2 loads with the attention
transformers picks for it (eager: SDPA cannot apply its logit soft-capping), qlora/integrations/attention.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config_dict, tiny_model_widths
from tests.test_fast_path import _peft_model

pytestmark = pytest.mark.slow

# model_type -> what its tiny config needs beyond the shared widths
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 64},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 64},
    "gemma3_text": {"head_dim": 16, "sliding_window": 64},
    "phi3": {},
    "olmo2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}
MOE_FAMILIES = [f for f, extra in FAMILIES.items() if "num_experts" in extra or "num_local_experts" in extra]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, smol_tokenizer_dir) -> dict[str, Path]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    shared = {**tiny_model_widths(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    dirs = {}
    for family, extra in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shared, **extra))
        out = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        dirs[family] = out
    return dirs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_reloads_merges_and_generates(family, family_dirs, prefect_server, tmp_path):
    from flows.finetune import finetune
    from qlora.evaluate import evaluate_model
    from qlora.inference import SamplingSettings, generate_texts, load_for_inference
    from qlora.merge import held_out_rows, merge_adapter

    raw = tiny_config_dict(family_dirs[family], tmp_path)
    raw["training"].update(max_steps=4, save_steps=0)
    raw["evaluation"].update(max_loss_rows=8, max_generation_rows=2, batch_size=2)  # a padded generation batch
    raw["evaluation"]["suites"] = [  # the harness on the family: base (adapter off) and fine-tuned
        {"name": "offline", "tasks": ["qlora_general_text", "qlora_heldout"], "limit": 2, "batch_size": 2,
         "max_gen_toks": 8}
    ]  # fmt: skip
    raw["tracking"]["system_metrics"] = False
    raw["registry"] = {"enabled": False}
    if family in MOE_FAMILIES:  # a mixed adapter: LoRA on every linear and on the fused experts, registered to serve
        raw["lora"]["target_parameters"] = ["all-experts"]
        raw["registry"] = {"model_name": f"tiny-{family}", "metric": "finetuned_eval_loss", "greater_is_better": False}
    config = tmp_path / f"{family}.yaml"
    config.write_text(yaml.safe_dump(raw))

    summary = finetune(config_path=str(config))
    assert summary["finetuned"]["eval_loss"] < summary["base"]["eval_loss"], summary
    from mlflow.tracking import MlflowClient

    harness = MlflowClient(raw["tracking"]["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.metrics
    tuned, base = (harness[f"{p}/qlora_general_text/bits_per_byte"] for p in ("harness", "base_harness"))
    assert 0 < tuned != base > 0 and "harness/qlora_heldout/exact_match" in harness
    if family in MOE_FAMILIES:  # the router's load-balancing loss, with the family's coefficient, in MLflow
        aux = MlflowClient(raw["tracking"]["tracking_uri"]).get_metric_history(summary["mlflow_run_id"], "aux_loss")
        assert aux and all(m.value > 0 for m in aux), aux
        # the registered champion as `mlflow models serve` loads it (its pyfunc: 4-bit experts, the adapter on them)
        import mlflow

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(raw["tracking"]["tracking_uri"])
        try:
            served = mlflow.pyfunc.load_model(f"models:/tiny-{family}@champion")
            (reply,) = served.predict(["Order from Ana: 2 mugs."], params={"max_new_tokens": 4})
        finally:
            mlflow.set_tracking_uri(previous)
        assert isinstance(reply, str)

    loaded = load_for_inference(summary["adapter_dir"])
    assert loaded.model.get_base_model().config.model_type == family
    data = held_out_rows(loaded)
    again = evaluate_model(loaded.model, loaded.tokenizer, data, loaded.config.evaluation, 160)
    assert again.metrics["eval_loss"] == pytest.approx(summary["finetuned"]["eval_loss"], rel=1e-4)
    (answer,) = generate_texts(loaded.model, loaded.tokenizer, ["Order from Ana: 2 mugs."], SamplingSettings(8))
    assert isinstance(answer, str)

    merged = merge_adapter(loaded, tmp_path / "merged", "fp32", max_loss_change_pct=1.0, min_agreement=0.0)
    assert abs(merged.check.loss_change_pct) <= 1.0 and (tmp_path / "merged" / "config.json").is_file()


def _documents(model_dir: Path, n: int = 6) -> list[list[int]]:
    """Chat documents of the bundled data, ~80-130 tokens: longer than the 64-token sliding windows above."""
    import random

    from transformers import AutoTokenizer

    from qlora.bundled_data import make_order_row

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(7)
    docs = [
        list(tokenizer.apply_chat_template(make_order_row(rng)["messages"], tokenize=True, return_dict=False))
        for _ in range(n)
    ]
    assert min(len(d) for d in docs) > 64
    return docs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_documents_get_their_per_document_loss(family, family_dirs, tmp_path):
    """The padding-free packed row SFTTrainer trains on gives every document of every family the loss it has alone
    (on the CPU: transformers' SDPA or eager attention with its block-diagonal mask, sliding windows included)."""
    from bench.packing import packed_vs_unpacked_loss

    model = _peft_model(family_dirs[family], tmp_path)[0]
    docs = _documents(family_dirs[family])
    check = packed_vs_unpacked_loss(model, docs, model.config.pad_token_id or 0, "cpu")
    assert check["abs_diff"] < 1e-3, check


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_path_packed_loss_equals_per_document_loss_on_the_gpu(family, family_dirs, tmp_path):
    """On CUDA, each family on its fast attention: the varlen kernel (sliding windows passed as its window), or,
    where varlen cannot compute the family's attention exactly (Gemma 2's soft-capping), flex attention."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bench.packing import packed_vs_unpacked_loss
    from qlora.integrations.attention import (
        VARLEN_ATTENTION,
        packed_fallback,
        packed_training_attention,
        varlen_available,
        varlen_unsupported,
    )

    assert varlen_available()
    model = _peft_model(family_dirs[family], tmp_path, "cuda", "bfloat16")[0]
    docs = _documents(family_dirs[family])
    pad = model.config.pad_token_id or 0
    # the reference: each document alone through transformers' own attention for the family (windows included)
    reference = packed_vs_unpacked_loss(model, docs, pad, "cuda")["per_document"]
    with packed_training_attention(model, VARLEN_ATTENTION, padding_free=True):
        used = model.config._attn_implementation
        # varlen where it computes the family exactly; else flex attention (soft-capping as a score modifier), or
        # for heads flex has no kernel for (this tiny Gemma 2's 16-wide ones) the loaded attention
        assert used == (VARLEN_ATTENTION if varlen_unsupported(model.config) is None else packed_fallback(model)), used
        packed = packed_vs_unpacked_loss(model, docs, pad, "cuda")["packed"]
    assert abs(packed - reference) < 1e-2, (packed, reference)  # bf16 activations


@pytest.mark.gpu
def test_gemma2_packed_rows_on_flex_attention_get_their_per_document_loss(smol_tokenizer_dir, tmp_path):
    """Gemma 2's soft-capping has no varlen kernel: its packed rows train on flex attention (soft-capping as a score
    modifier, a block mask per document and sliding window), which must give each document its own loss."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bench.packing import packed_vs_unpacked_loss
    from qlora.integrations.attention import VARLEN_ATTENTION, packed_training_attention

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    widths = {
        **tiny_model_widths(tokenizer),
        "hidden_size": 128,
        "head_dim": 32,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    model_dir = tmp_path / "gemma2-32"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **widths, sliding_window=64)).save_pretrained(
        model_dir
    )
    tokenizer.save_pretrained(model_dir)
    model = _peft_model(model_dir, tmp_path, "cuda", "bfloat16")[0]
    docs = _documents(model_dir)
    reference = packed_vs_unpacked_loss(model, docs, tokenizer.pad_token_id, "cuda")["per_document"]
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    row = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
        [{"input_ids": d} for d in docs]
    )
    row = {k: v.to("cuda") for k, v in row.items() if torch.is_tensor(v)}
    with packed_training_attention(model, VARLEN_ATTENTION, padding_free=True):
        assert model.config._attn_implementation == "flex_attention"
        # with gradients, as in training (flex's inductor lowering of a no-grad forward finds no kernel on an H200)
        packed = model(**row).loss.item()
    assert abs(packed - reference) < 1e-2, (packed, reference)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_experts_are_stored_in_4_bits_and_dequantize_for_a_merge(family, family_dirs):
    """transformers 5 keeps a MoE block's experts as fused 3-D parameters, which from_pretrained's bitsandbytes
    quantization leaves in 16 bits; the loader quantizes them (NF4 with the run's settings), the router stays as
    loaded, and a merge gets them back de-quantized, computing what the 4-bit model computes."""
    import torch

    from pipeline_config.schema import ModelConfig, QuantizationConfig
    from qlora.model import dequantize_expert_parameters, expert_parameters, four_bit_share, load_quantized_model
    from qlora.model_source import resolve_model_source

    source = resolve_model_source(ModelConfig(name_or_path=str(family_dirs[family])))
    model = load_quantized_model(source, QuantizationConfig(compute_dtype="float32", double_quant=True), "cpu")
    assert four_bit_share(model, experts_only=True) == 1.0 and four_bit_share(model) == 1.0
    assert not expert_parameters(model)  # none left as a plain float parameter
    router = model.model.layers[0].mlp.gate
    assert router.weight.dtype == torch.float32 and router.weight.dim() == 2
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    model.train()  # bitsandbytes' CPU path for the linear layers, as in training
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
        dequantize_expert_parameters(model, torch.float32)
        plain = model(input_ids=ids).logits
    assert len(expert_parameters(model)) == 2 * len(model.model.layers)
    torch.testing.assert_close(plain, quantized, rtol=0, atol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_quantized_as_they_load_equal_experts_quantized_after(family, family_dirs):
    """The loader quantizes each expert weight the moment transformers sets it (peak memory: one layer's experts in
    16 bits, qlora/integrations/expert_loading.py): bit for bit what quantizing the loaded model gives."""
    import torch
    import transformers.core_model_loading
    from torch.nn.utils import parametrize
    from transformers import AutoModelForCausalLM

    from pipeline_config.schema import QuantizationConfig
    from qlora.integrations.expert_loading import quantize_experts_while_loading
    from qlora.model import _quantize_expert, build_bnb_config, quantize_expert_parameters

    quant = QuantizationConfig(compute_dtype="float32", double_quant=True)
    load = dict(dtype=torch.float32, quantization_config=build_bnb_config(quant), device_map={"": "cpu"})
    set_param = transformers.core_model_loading.set_param_for_module
    with quantize_experts_while_loading(lambda module, name: _quantize_expert(module, name, quant)) as names:
        during = AutoModelForCausalLM.from_pretrained(family_dirs[family], **load)
    assert transformers.core_model_loading.set_param_for_module is set_param  # put back
    assert len(names) == 2 * len(during.model.layers) and quantize_expert_parameters(during, quant) == 0
    after = AutoModelForCausalLM.from_pretrained(family_dirs[family], **load)
    assert quantize_expert_parameters(after, quant) == len(names)
    modules = dict(after.named_modules())
    for module_name, module in during.named_modules():
        if parametrize.is_parametrized(module):
            for name, chain in module.parametrizations.items():
                other = modules[module_name].parametrizations[name]
                assert torch.equal(chain.original, other.original)
                assert torch.equal(getattr(module, name), getattr(modules[module_name], name))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_on_4_bit_experts_trains_both_weights_reloads_and_merges(family, family_dirs, tmp_path):
    """LoRA on the experts (lora.target_parameters) and on attention in one adapter, over 4-bit experts: both expert
    weights of a block get gradients (peft nests two wrappers there), a forward does not change the next one (peft
    0.21.2 would stack its delta on every forward: qlora/integrations/expert_lora.py), the saved adapter reloads onto
    a fresh 4-bit base exactly, and peft's merge into the de-quantized base equals the unmerged adapter there."""
    import torch
    from peft import PeftModel, get_peft_model

    from pipeline_config.schema import LoraAdapterConfig, ModelConfig, QuantizationConfig
    from qlora.merge import dequantized_base
    from qlora.model import build_lora_config, load_quantized_model
    from qlora.model_source import resolve_model_source

    model_cfg = ModelConfig(name_or_path=str(family_dirs[family]))
    quant = QuantizationConfig(compute_dtype="float32")
    base = load_quantized_model(resolve_model_source(model_cfg), quant, "cpu")
    lora = LoraAdapterConfig(r=4, target_modules=["q_proj", "v_proj"], target_parameters=["all-experts"])
    model = get_peft_model(base, build_lora_config(lora, base))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: a non-zero adapter, so that every product counts
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    expert_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    assert len(expert_grads) == 4 * len(base.model.layers)  # A and B of gate_up_proj and down_proj in each layer
    assert all(g is not None and g.abs().sum() > 0 for g in expert_grads.values()), sorted(expert_grads)
    with torch.no_grad():
        again = model(input_ids=ids, labels=ids).loss
    assert again.item() == loss.item()

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        load_quantized_model(resolve_model_source(model_cfg), quant, "cpu"), tmp_path / "adapter"
    )
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        unmerged = PeftModel.from_pretrained(
            dequantized_base(model_cfg, quant, torch.float32, "cpu"), tmp_path / "adapter"
        )
        unmerged_logits = unmerged(input_ids=ids).logits
        merged = unmerged.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_dpo_keeps_its_starting_adapter_as_the_reference(family, family_dirs, tmp_path):
    """DPO (training.method dpo) on every family, from a trained (non-zero) starting adapter: at a learning rate of
    0 its rewards and margins are exactly 0, which holds only if the reference policy is that adapter (TRL's frozen
    "ref" copy) and not the bare base; the evaluation's "before" is that adapter too. The starting policy first
    answers two prompts (preference.policy_rejected): 4 tokens are never a whole order, so both become rejected."""

    from pipeline_config.schema import PipelineConfig
    from qlora.evaluate import evaluate_base_and_finetuned
    from qlora.train import Stage, train_adapter
    from tests.test_stages import _write_rows, order_stage_rows

    rows = _write_rows(tmp_path / "pairs.jsonl", order_stage_rows(8, 3, "preference"))
    cfg = PipelineConfig(
        model={"name_or_path": str(family_dirs[family])},
        quantization={"compute_dtype": "float32"},
        lora={"r": 4, "target_modules": "all-linear"},
        data={"source": rows, "eval_fraction": 0.25},
        training={"method": "dpo", "max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1,
                  "max_seq_length": 192, "output_dir": str(tmp_path / "out"), "device": "cpu", "save_steps": 0},
        preference={"policy_rejected": {"max_prompts": 2, "max_new_tokens": 4, "batch_size": 2}},
        evaluation={"max_loss_rows": 2, "max_generation_rows": 0},
    )  # fmt: skip
    base, tokenizer, data, starting = _base_with_a_trained_starting_adapter(cfg, tmp_path)
    training = cfg.training.model_copy(update={"learning_rate": 0.0})
    result = train_adapter(base, data, tokenizer, cfg.lora, training, "cpu", stage=Stage(cfg, starting))
    assert result.metrics["stage/rewards/margins"] == 0.0 and result.metrics["stage/rewards/chosen"] == 0.0
    assert (result.metrics["stage/policy_answered"], result.metrics["stage/policy_mistakes"]) == (2.0, 2.0)
    comparison = evaluate_base_and_finetuned(result.model, tokenizer, data, cfg.evaluation, 192)
    assert comparison.base.metrics["eval_loss"] == comparison.finetuned.metrics["eval_loss"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_grpo_samples_and_scores_from_its_starting_adapter(family, family_dirs, tmp_path):
    """GRPO (training.method grpo) on every family, from a trained (non-zero) starting adapter: completions are
    sampled in batches through the 4-bit model with the adapter (mixture-of-experts models too: generation with
    router logits on fails on a padded batch), every reward function scores them, and the KL to the reference is
    exactly 0 at the first step, which holds only if the reference policy is that starting adapter."""

    from pipeline_config.schema import PipelineConfig
    from qlora.train import Stage, train_adapter
    from tests.test_stages import _write_rows, order_stage_rows

    rows = _write_rows(tmp_path / "prompts.jsonl", order_stage_rows(8, 3, "prompt_only"))
    cfg = PipelineConfig(
        model={"name_or_path": str(family_dirs[family])},
        quantization={"compute_dtype": "float32"},
        lora={"r": 4, "target_modules": "all-linear"},
        data={"source": rows, "eval_fraction": 0.25},
        training={"method": "grpo", "max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1,
                  "max_seq_length": 192, "output_dir": str(tmp_path / "out"), "device": "cpu", "save_steps": 0},
        grpo={"num_generations": 2, "max_completion_length": 6, "beta": 0.04,
              "rewards": [{"function": "valid_json"}, {"function": "field_match"}]},
        evaluation={"max_loss_rows": 2, "max_generation_rows": 0},
    )  # fmt: skip
    base, tokenizer, data, starting = _base_with_a_trained_starting_adapter(cfg, tmp_path)
    result = train_adapter(base, data, tokenizer, cfg.lora, cfg.training, "cpu", stage=Stage(cfg, starting))
    metrics = result.metrics
    assert metrics["stage/kl"] == 0.0
    assert {"stage/rewards/valid_json/mean", "stage/rewards/field_match/mean"} <= set(metrics)
    assert 0 < metrics["stage/completions/mean_length"] <= 6


def _base_with_a_trained_starting_adapter(cfg, tmp_path):
    """The 4-bit base of `cfg`, its tokenizer and data, and a starting adapter saved to `tmp_path / "start"` with
    non-zero LoRA weights in bf16 values, as SFT trains them (against the bare base a reference would differ)."""
    import torch
    from peft import get_peft_model

    from qlora.data import load_dataset_splits
    from qlora.model import build_lora_config, load_quantized_model
    from qlora.model_source import resolve_model_source
    from qlora.stages import StartingAdapter
    from qlora.tokenizer import setup_tokenizer

    source = resolve_model_source(cfg.model)
    tokenizer = setup_tokenizer(source, cfg.tokenizer, needs_chat_template=False)
    data = load_dataset_splits(cfg.data)
    base = load_quantized_model(source, cfg.quantization, "cpu")
    start = get_peft_model(base, build_lora_config(cfg.lora, base))
    for name, param in start.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5, generator=torch.Generator().manual_seed(len(name)))
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16).float()
    start.save_pretrained(tmp_path / "start")
    return start.unload(), tokenizer, data, StartingAdapter(path=str(tmp_path / "start"), spec="start")
