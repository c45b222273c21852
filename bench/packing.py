"""The packing check: a padding-free packed row must give the same loss as its documents one by one."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.memory import free_accelerator_memory
from bench.settings import BenchConfig
from bench.variants import project_config


def packed_vs_unpacked_loss(model, docs: list[list[int]], pad_token_id: int, device: str) -> dict:
    """Mean next-token loss of `docs` packed padding-free into one row (the collator SFTTrainer uses with bfd
    packing) and of each document on its own; equal when documents cannot see each other."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    packed = {
        k: v.to(device) if torch.is_tensor(v) else v for k, v in collator([{"input_ids": d} for d in docs]).items()
    }
    model.train()  # the training path (bitsandbytes' CPU eval mode repacks weights); no dropout in these layers
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits.float()
        labels = packed["labels"]
        packed_sum = torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"
        ).item()
        count = int((labels[0, 1:] != -100).sum())
        single_sum = 0.0
        for doc in docs:
            ids = torch.tensor([doc], device=device)
            out = model(input_ids=ids).logits.float()
            single_sum += torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum").item()
    packed_loss, single_loss = packed_sum / count, single_sum / sum(len(d) - 1 for d in docs)
    return {"packed": packed_loss, "per_document": single_loss, "abs_diff": abs(packed_loss - single_loss)}


def packing_check(cfg: BenchConfig, model_dir: Path, tokenizer, rows, device: str) -> dict:
    """The packed-vs-unpacked loss of the project's model set-up (its attention kernel), LoRA weights random."""
    from peft import get_peft_model

    from qlora.integrations.attention import packed_training_attention, resolve_attention
    from qlora.model import build_lora_config, load_quantized_model
    from qlora.model_source import resolve_model_source

    pcfg = project_config(cfg, model_dir, str(Path(cfg.out_dir) / "packing-check"), device)  # nothing is written
    model = load_quantized_model(resolve_model_source(pcfg.model), pcfg.quantization, device, pcfg.training.attention)
    lora = build_lora_config(pcfg.lora)
    lora.init_lora_weights = False  # random B too, so the adapter path changes the output
    model = get_peft_model(model, lora)
    docs = rows[:8]
    with packed_training_attention(model, resolve_attention(pcfg.training.attention, device), padding_free=True):
        result = packed_vs_unpacked_loss(model, docs, tokenizer.pad_token_id, device)
        result["attention"] = model.config._attn_implementation
    result["documents"] = [len(d) for d in docs]
    del model
    free_accelerator_memory()
    return result
