"""Throughput of the evaluation suites on a GPU: items per second of a multiple-choice and a generative harness task
through the flow's path (qlora/suites.py: an `HFLM` around the 4-bit model with its LoRA adapter on) against
lm-evaluation-harness loading the same checkpoint itself (`simple_evaluate(model="hf", ...)`, what `lm_eval --model
hf` calls), in bf16, in 4-bit NF4 from its own options, and on the 4-bit checkpoint saved from the flow's model
(with and without the adapter through its `peft=` argument): same machine, same tasks, limit and batch size.

    python -m bench.harness_speed --tokenizer-dir /tmp/tokpack --out /tmp/out/harness-speed.json

The model is the bench's Llama-2-7B shape with random weights (no hub on the GPU machine), built once under
--model-dir by bench/models.py. The
tasks are offline: multiple choice over continuations of Python-documentation prose (4 choices), and generation of
up to 64 tokens after a prompt (random weights never stop early, so every item generates the same number of tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def _tasks(folder: Path, n_mc: int, n_gen: int) -> list[dict]:
    from qlora.suites import general_text_documents

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paragraphs = [p.split() for p in general_text_documents(64)]
    mc = []
    for i in range(n_mc):
        words = paragraphs[i % len(paragraphs)]
        start = rng.randrange(0, max(1, len(words) - 60))
        context, truth = " ".join(words[start : start + 40]), " ".join(words[start + 40 : start + 48])
        others = [" ".join(rng.choice(paragraphs)[:8]) for _ in range(3)]
        label = rng.randrange(4)
        choices = others[:label] + [truth] + others[label:]
        mc.append({"context": context, "choices": choices, "label": label})
    gen = [{"prompt": " ".join(paragraphs[i % len(paragraphs)][:48]), "answer": "x"} for i in range(n_gen)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))

    def task(name, path, **spec):
        data = {"data_files": {"test": str(path)}}
        return {"task": name, "dataset_path": "json", "dataset_kwargs": data, "test_split": "test", **spec}

    return [
        task(
            "speed_mc",
            folder / "mc.jsonl",
            output_type="multiple_choice",
            doc_to_text="{{context}}",
            doc_to_choice="{{choices}}",
            doc_to_target="{{label}}",
            metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
        ),
        task(
            "speed_gen",
            folder / "gen.jsonl",
            output_type="generate_until",
            doc_to_text="{{prompt}}",
            doc_to_target="{{answer}}",
            generation_kwargs={"until": ["\n\n\n\n"], "max_gen_toks": 64, "do_sample": False},
            metric_list=[{"metric": "exact_match"}],
        ),
    ]


def _build_model(model_dir: Path, tokenizer_dir: str) -> Path:
    """The bench's Llama-2-7B shape with random weights (bench/models.py), built once under `model_dir`."""
    from transformers import AutoTokenizer

    from bench.models import build_model_dir
    from bench.settings import BenchConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = BenchConfig(model="llama2-7b", model_dir=str(model_dir))
    return build_model_dir(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, "cuda")


def _timed(label: str, run) -> dict:
    torch.cuda.synchronize()
    started = time.perf_counter()
    results = run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    items = {t: v["effective"] for t, v in results["n-samples"].items()}
    print(f"{label}: {seconds:.1f} s for {items}", flush=True)
    return {"seconds": seconds, "items": items}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/bench-models")
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--mc", type=int, default=400, help="multiple-choice items")
    parser.add_argument("--gen", type=int, default=64, help="generative items")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="harness-speed.json")
    parser.add_argument("--only", action="append", default=[], help="run only this variant (repeatable)")
    args = parser.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model_dir = _build_model(Path(args.model_dir), args.tokenizer_dir)
    tokenizer_dir = args.tokenizer_dir
    tasks = _tasks(Path("/tmp/harness-speed-tasks"), args.mc, args.gen)
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    report = {"gpu": torch.cuda.get_device_name(), "batch_size": args.batch_size, "variants": {}}

    def save_4bit_checkpoint() -> tuple[Path, Path]:
        """The 4-bit model as the flow holds it, saved (quantization_config in its config.json) with a LoRA adapter:
        what lm-eval's own `hf` model loads in 4-bit on transformers 5 (`--model_args pretrained=DIR,peft=ADAPTER`)."""
        checkpoint, adapter = Path(args.model_dir) / "nf4-checkpoint", Path(args.model_dir) / "nf4-adapter"
        if not (adapter / "adapter_config.json").is_file():
            base = AutoModelForCausalLM.from_pretrained(
                model_dir, quantization_config=nf4, dtype=torch.bfloat16, device_map={"": 0}
            )
            base.save_pretrained(checkpoint)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(checkpoint)
            get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).save_pretrained(adapter)
            del base
            torch.cuda.empty_cache()
        return checkpoint, adapter

    def own_4bit_lm(with_adapter: bool):
        checkpoint, adapter = save_4bit_checkpoint()
        extra = {"peft": str(adapter)} if with_adapter else {}
        return HFLM(pretrained=str(checkpoint), dtype="bfloat16", batch_size=args.batch_size, max_length=4096, **extra)

    def flow_lm():  # the flow's path: the 4-bit base loaded once (in the compute dtype, as qlora/model.py loads it),
        # the adapter on, an HFLM around the model
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=nf4, dtype=torch.bfloat16, device_map={"": 0}
        )
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=4096)

    # lm-eval's own `hf` model (what `lm_eval --model hf --model_args ...` builds) on the same checkpoint
    variants = {
        "flow (4-bit + adapter)": flow_lm,
        "lm_eval hf bf16": lambda: HFLM(
            pretrained=str(model_dir), tokenizer=tokenizer_dir, dtype="bfloat16", batch_size=args.batch_size
        ),
        "lm_eval hf 4-bit checkpoint + peft": lambda: own_4bit_lm(True),
        "lm_eval hf 4-bit checkpoint": lambda: own_4bit_lm(False),
        # the harness's own 4-bit options (it builds its BitsAndBytesConfig from them)
        "lm_eval hf 4-bit": lambda: HFLM(
            pretrained=str(model_dir),
            tokenizer=tokenizer_dir,
            dtype="bfloat16",
            batch_size=args.batch_size,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype="bfloat16",
            bnb_4bit_use_double_quant=True,
        ),
    }
    for label, build in variants.items():
        if args.only and label not in args.only:
            continue
        try:
            lm = build()
        except Exception as exc:  # noqa: BLE001  (a variant the harness cannot load is reported, not fatal)
            report["variants"][label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{label}: {exc}", flush=True)
            continue
        for task in tasks:
            settings = {"tasks": [task], "log_samples": False, "bootstrap_iters": 0}
            simple_evaluate(model=lm, limit=8, **settings)  # warm-up: kernels, caches (untimed)
            report["variants"][f"{task['task']}/{label}"] = _timed(
                f"{task['task']} {label}", lambda lm=lm, settings=settings: simple_evaluate(model=lm, **settings)
            )
        lm = None
        torch.cuda.empty_cache()
    for result in report["variants"].values():
        if "seconds" in result:
            result["items_per_s"] = sum(result["items"].values()) / result["seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
