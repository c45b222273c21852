"""Dataset loading: bundled generator, local files in every supported type and format, and clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline_config.schema import DataConfig
from qlora.bundled_data import generate_orders
from qlora.data import eval_prompt_and_reference, load_dataset_splits
from qlora.errors import DataError


def test_bundled_orders_are_deterministic_sized_and_disjoint():
    a = generate_orders(1000, 200, seed=7)
    b = generate_orders(1000, 200, seed=7)
    assert a == b
    assert len(a["train"]) == 1000 and len(a["test"]) == 200
    train_inputs = {r["messages"][1]["content"] for r in a["train"]}
    assert not train_inputs & {r["messages"][1]["content"] for r in a["test"]}
    answer = json.loads(a["train"][0]["messages"][2]["content"])
    assert list(answer) == ["name", "item", "quantity", "date"] and isinstance(answer["quantity"], int)
    assert generate_orders(1000, 200, seed=8)["train"] != a["train"]


def test_bundled_splits_and_digest():
    splits = load_dataset_splits(DataConfig(source="bundled:orders"))
    assert splits.kind == "messages" and len(splits.train) == 1200 and len(splits.eval) == 240
    assert splits.digest == load_dataset_splits(DataConfig(source="bundled:orders")).digest
    assert splits.digest != load_dataset_splits(DataConfig(source="bundled:orders", seed=1)).digest


ROWS = {
    "messages": [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(10)
    ],
    "text": [{"text": f"<s>[INST] q{i} [/INST] a{i} </s>"} for i in range(10)],
    "alpaca": [{"instruction": f"q{i}", "input": "" if i % 2 else "ctx", "output": f"a{i}"} for i in range(10)],
    "prompt_completion": [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)],
}
EXPECTED_KIND = {"messages": "messages", "text": "text", "alpaca": "messages", "prompt_completion": "prompt_completion"}


def _write(path, rows, suffix):
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)


# Chat turns are nested lists, which CSV cannot hold: every other (format, file type) pair is covered.
CASES = [(f, s) for f in ROWS for s in (".jsonl", ".json", ".csv", ".parquet") if (f, s) != ("messages", ".csv")]


@pytest.mark.parametrize(("fmt", "suffix"), CASES)
def test_local_file_types_and_formats(tmp_path, fmt, suffix):
    path = tmp_path / f"data{suffix}"
    _write(path, ROWS[fmt], suffix)
    splits = load_dataset_splits(DataConfig(source=str(path), eval_fraction=0.2, seed=0, response_template="[/INST]"))
    assert splits.kind == EXPECTED_KIND[fmt]
    assert len(splits.train) == 8 and len(splits.eval) == 2
    row = splits.train[0]
    prompt, reference = eval_prompt_and_reference(row, splits.kind, "[/INST]")
    assert prompt and reference.strip().startswith("a")
    if fmt == "alpaca":
        user = next(r for r in splits.train if r["messages"][0]["content"].startswith("q0"))["messages"][0]
        assert user["content"] == "q0\n\nctx"


def test_column_mapping_and_system_prompt(tmp_path):
    path = tmp_path / "d.jsonl"
    _write(path, [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)], ".jsonl")
    cfg = DataConfig(
        source=str(path),
        format="alpaca",
        columns={"instruction": "question", "output": "answer"},
        system_prompt="Be brief.",
        eval_fraction=0.2,
    )
    splits = load_dataset_splits(cfg)
    turns = splits.train[0]["messages"]
    assert [t["role"] for t in turns] == ["system", "user", "assistant"] and turns[0]["content"] == "Be brief."


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        load_dataset_splits(DataConfig(source=str(path)))


def test_missing_column_lists_available(tmp_path):
    path = tmp_path / "d.jsonl"
    _write(path, [{"body": "x"}] * 4, ".jsonl")
    with pytest.raises(DataError, match="column 'text' .* available columns: body"):
        load_dataset_splits(DataConfig(source=str(path), format="text"))


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset_splits(DataConfig(source=str(tmp_path / "nope.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        load_dataset_splits(DataConfig(source=str(empty)))


def test_hub_id_without_network_says_so():
    with pytest.raises(DataError, match="local .jsonl"):
        load_dataset_splits(DataConfig(source="someone/not-a-local-dataset"))
