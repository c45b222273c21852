"""Using a trained model: generate from a folder or a registry URI, batched vs one by one, chat in a terminal,
compare with the base, merge (checked, loadable without peft, registered by the merge flow, refused when broken).

One tiny flow run (module fixture) provides the adapter folder and the registered `tiny-use@champion`.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from flows.cli import main
from qlora.inference import SamplingSettings, as_prompt, generate_texts, load_for_inference
from tests.conftest import train_tiny_champion

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-use"
PROMPTS = ["Order: 2 mugs for Ana", "Hi", "Ship three lamps to Lee Wong on 4 June 2025, please, as fast as you can"]


@pytest.fixture(scope="module")
def trained(prefect_server, tiny_llama_dir, tmp_path_factory) -> dict:
    """A 6-step flow run of the tiny model, registered as tiny-use@champion."""
    tmp = tmp_path_factory.mktemp("use")
    summary, raw = train_tiny_champion(tiny_llama_dir, tmp, MODEL_NAME, generation_rows=2)
    return {"tmp": tmp, "adapter": summary["adapter_dir"], "tracking_uri": raw["tracking"]["tracking_uri"]}


def test_generating_from_the_folder_and_from_the_registry_gives_the_same_greedy_text(trained, capsys):
    settings = SamplingSettings(max_new_tokens=8)
    from_folder = load_for_inference(trained["adapter"])
    from_registry = load_for_inference(f"models:/{MODEL_NAME}@champion", trained["tracking_uri"])
    assert (from_folder.kind, from_registry.kind) == ("adapter", "adapter")
    chats = [as_prompt(p, from_folder.has_chat_template) for p in PROMPTS]  # what the CLI sends a chat model
    a = generate_texts(from_folder.model, from_folder.tokenizer, chats, settings)
    b = generate_texts(from_registry.model, from_registry.tokenizer, chats, settings)
    assert a == b and any(a)
    # and through the CLI, by version number, with a prompts file: answers in JSONL, in order
    prompts = trained["tmp"] / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    code = main(
        ["generate", "--model", f"models:/{MODEL_NAME}/1", "--prompts", str(prompts), "--max-new-tokens", "8"]
        + ["--tracking-uri", trained["tracking_uri"], "--batch-size", "2"]
    )
    assert code == 0
    rows = [json.loads(line) for line in prompts.with_suffix(".out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["output"] for r in rows] == a


def test_batched_greedy_output_equals_one_by_one(trained):
    loaded = load_for_inference(trained["adapter"])
    settings = SamplingSettings(max_new_tokens=10)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]  # different lengths: left padding in the batch
    batched = generate_texts(loaded.model, loaded.tokenizer, chats, settings, batch_size=3)
    single = [generate_texts(loaded.model, loaded.tokenizer, [c], settings, batch_size=1)[0] for c in chats]
    assert batched == single


def _read_until_prompts(fd: int, seen: list[str], count: int, timeout_s: float = 240) -> None:
    """Read the terminal until it has shown `count` "you> " prompts (or the child closed it)."""
    deadline = time.monotonic() + timeout_s
    while "".join(seen).count("you> ") < count:
        assert time.monotonic() < deadline, "".join(seen)[-2000:]
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                seen.append(os.read(fd, 4096).decode(errors="replace"))
            except OSError:  # the child closed the terminal
                return


def test_chat_through_a_terminal_keeps_history_resets_and_exits(trained):
    """Scripted turns through a pseudo-terminal: the first answer equals `generate` for the same single-turn chat;
    /reset starts over (the same question then gets the same first answer again); /exit ends with code 0."""
    loaded = load_for_inference(trained["adapter"])
    expected = generate_texts(
        loaded.model, loaded.tokenizer, [[{"role": "user", "content": "Hi"}]], SamplingSettings(max_new_tokens=6)
    )[0]
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "chat", "--model", trained["adapter"], "--max-new-tokens", "6"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=REPO,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    seen: list[str] = []
    try:
        _read_until_prompts(leader, seen, 1)
        for number, turn in enumerate(("Hi", "And again?", "/reset", "Hi"), start=2):
            os.write(leader, (turn + "\n").encode())
            _read_until_prompts(leader, seen, number)
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        os.close(leader)
    text = "".join(seen).replace("\r", "")
    answers = [line.removeprefix("model> ").strip() for line in text.splitlines() if line.startswith("model> ")]
    assert len(answers) == 3, text[-2000:]
    assert "(conversation reset)" in text
    assert answers[0] == expected and answers[2] == expected  # the same fresh conversation after /reset


def test_compare_writes_a_side_by_side_report_and_logs_it(trained, capsys):
    client = MlflowClient(trained["tracking_uri"])
    run_id = client.get_model_version(MODEL_NAME, "1").run_id
    out = trained["tmp"] / "compare"
    code = main(
        ["compare", "--model", trained["adapter"], "--max-new-tokens", "8", "--out-dir", str(out)]
        + ["--mlflow-run", run_id, "--tracking-uri", trained["tracking_uri"]]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "base" in table and "fine-tuned" in table and "expected" in table  # held-out prompts by default
    rows = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert len(rows) > 0 and all({"prompt", "base", "finetuned", "expected"} <= r.keys() for r in rows)
    loaded = load_for_inference(trained["adapter"])
    with loaded.model.disable_adapter():
        base = generate_texts(loaded.model, loaded.tokenizer, [rows[0]["prompt"]], SamplingSettings(max_new_tokens=8))
    assert rows[0]["base"] == base[0]
    assert "| prompt | base | fine-tuned |" in (out / "compare.md").read_text()
    logged = {a.path for a in client.list_artifacts(run_id, "compare")}
    assert logged == {"compare/compare.jsonl", "compare/compare.md"}


def test_merged_model_matches_base_plus_adapter_and_loads_without_peft(trained):
    """fp32 on the CPU. The merged model, loaded in a fresh process that cannot import peft or bitsandbytes, equals
    the same de-quantized base with the adapter applied by peft (unmerged) to 1e-4; against base + adapter in
    4-bit (bitsandbytes' CPU kernel, whose de-quantization rounds differently) its eval loss is within 0.1 %."""
    from qlora.merge import dequantized_base, merge_adapter

    loaded = load_for_inference(trained["adapter"])
    ids = loaded.tokenizer("Order: 2 mugs for Ana, 3 lamps for Lee", return_tensors="pt")["input_ids"]
    out = trained["tmp"] / "merged"
    # A 6-step random tiny model has near-flat logits, so rounding flips some greedy tokens: agreement is reported,
    # not required here (a trained model agrees: README's merge example shows 100 %).
    result = merge_adapter(loaded, out, dtype="fp32", min_agreement=0.0, loss_rows=8, prompts=4)
    assert result.check.passed and 0 <= result.check.agreement <= 1 and result.check.prompts == 4
    assert abs(result.check.loss_change_pct) < 0.1
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    from peft import PeftModel

    unmerged = PeftModel.from_pretrained(
        dequantized_base(loaded.config.model, loaded.config.quantization, torch.float32, "cpu"), trained["adapter"]
    ).eval()
    with torch.inference_mode():
        reference = unmerged(input_ids=ids).logits.float()
    script = (
        "import sys, json, torch; sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.inference_mode(): print(json.dumps(m(input_ids=ids).logits.float().tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (merged - reference).abs().max().item() < 1e-4


def test_a_merge_that_changes_the_model_is_refused_and_saves_nothing(trained, monkeypatch):
    """Forced failure: the merge step scales the adapter tenfold before merging (as a broken merge would change
    the weights); the check sees the difference and refuses."""
    import qlora.merge
    from qlora.merge import MergeRefused, merge_adapter

    real = qlora.merge.merged_model

    def broken_merge(base, adapter_dir):
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, adapter_dir)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data *= 10
        return model.merge_and_unload()

    monkeypatch.setattr(qlora.merge, "merged_model", broken_merge)
    out = trained["tmp"] / "refused"
    with pytest.raises(MergeRefused, match=r"does not behave like base \+ adapter: eval loss .* not saved"):
        merge_adapter(load_for_inference(trained["adapter"]), out, dtype="fp32", min_agreement=0.0, loss_rows=8)
    assert not out.exists() and not list(out.parent.glob(".refused*"))
    assert real is not broken_merge


def test_the_merge_flow_registers_a_merged_version(trained, monkeypatch):
    from flows.merge import merge

    monkeypatch.chdir(trained["tmp"])
    summary = merge(
        model=f"models:/{MODEL_NAME}@champion",
        output=str(trained["tmp"] / "merged-by-flow"),
        dtype="fp32",
        min_agreement=0.0,  # the tiny random model: see test_merged_model_matches_base_plus_adapter...
        tracking_uri=trained["tracking_uri"],
    )
    assert summary["name"] == f"{MODEL_NAME}-merged" and summary["version"] == "1"
    client = MlflowClient(trained["tracking_uri"])
    version = client.get_model_version(f"{MODEL_NAME}-merged", "1")
    assert version.tags["source_adapter_name"] == MODEL_NAME and version.tags["source_adapter_version"] == "1"
    mlflow.set_tracking_uri(trained["tracking_uri"])
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}-merged/1")
    assert "transformers" in info.flavors and info.signature is not None
    assert info.saved_input_example_info is not None
    # the registered merged model generates like the merged folder the flow wrote
    from_registry = load_for_inference(f"models:/{MODEL_NAME}-merged/1", trained["tracking_uri"])
    from_folder = load_for_inference(summary["merged_dir"])
    settings = SamplingSettings(max_new_tokens=6)
    assert generate_texts(from_registry.model, from_registry.tokenizer, PROMPTS, settings) == generate_texts(
        from_folder.model, from_folder.tokenizer, PROMPTS, settings
    )
