"""The `unsloth` / `unsloth_lean` bench variants, run in a process of their own on an Unsloth environment.

    python bench/unsloth_worker.py SPEC.json      (started by `qlora-flow bench`, never imported by the project)

Unsloth pins older transformers and TRL than this project, so it never shares a process (or a dependency list) with
it: `qlora-flow bench --unsloth-site DIR` runs this file with DIR on PYTHONPATH in place of the project's packages.
It imports nothing from the project. The spec gives the bench's model folder (random weights, the same ones the
other variants load), the same synthetic rows, batch geometry and step counts; the measurement is the bench's:
non-pad input tokens of the timed steps over their device-synchronised wall time, after the warm-up steps.

Settings: Unsloth's documented QLoRA path, `FastLanguageModel.from_pretrained(load_in_4bit=True, dtype=bf16)`,
`get_peft_model(r, alpha, dropout 0, all 7 linear projections)`, TRL's SFTTrainer with packing (padding-free) and
adamw_torch as the project uses; `unsloth` trains without checkpointing, `unsloth_lean` with Unsloth's offloaded
checkpointing (`use_gradient_checkpointing="unsloth"`).

A model Unsloth cannot load or wrap (a family it does not support) prints `UNSUPPORTED_JSON {"reason": ...}` and
exits 0: the bench reports the variant as skipped with that reason.
"""

from __future__ import annotations

import json
import os
import sys
import time

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS"):
    os.environ.setdefault(_key, "1")


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    import unsloth  # noqa: F401  (first: it patches transformers and TRL on import)

    # isort: split
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    checkpointing = "unsloth" if spec["lean"] else False
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=spec["model_dir"],
            max_seq_length=spec["seq_len"],
            dtype=torch.bfloat16,
            load_in_4bit=True,
            local_files_only=True,
            use_gradient_checkpointing=checkpointing,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=spec["r"],
            lora_alpha=spec["alpha"],
            lora_dropout=0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            use_gradient_checkpointing=checkpointing,
            bias="none",
            random_state=spec["seed"],
        )
    except torch.cuda.OutOfMemoryError:
        raise  # a measurement (the variant's error), not an unsupported family
    except Exception as exc:  # a model family this Unsloth cannot load or wrap: the bench reports it as skipped
        import traceback

        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        print("UNSUPPORTED_JSON " + json.dumps({"reason": reason}), flush=True)
        return
    rows = json.loads(open(spec["rows_file"]).read())
    pad = tokenizer.pad_token_id
    warmup, timed = spec["warmup_steps"], spec["steps"]
    args = SFTConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_rows"],
        gradient_accumulation_steps=1,
        max_length=spec["seq_len"],
        packing=True,
        max_steps=warmup + timed,
        learning_rate=spec["learning_rate"],
        warmup_steps=0.03,
        logging_steps=1,
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        seed=spec["seed"],
        bf16=True,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=bool(checkpointing),
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"input_ids": rows}), args=args
    )
    tokens = []
    step_training = trainer.training_step

    def counting_step(m, inputs, *rest, **kwargs):
        tokens.append(int((inputs["input_ids"] != pad).sum()) if pad is not None else inputs["input_ids"].numel())
        return step_training(m, inputs, *rest, **kwargs)

    trainer.training_step = counting_step
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    wall = ends[warmup + timed - 1] - ends[warmup - 1]
    timed_tokens = sum(tokens[warmup : warmup + timed])
    import unsloth as u

    result = {
        "tokens_per_s": timed_tokens / wall,
        "step_time_s": wall / timed,
        "tokens_per_step": timed_tokens / timed,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "versions": {"unsloth": u.__version__, "torch": torch.__version__, "trl": sys.modules["trl"].__version__},
    }
    print("RESULT_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
