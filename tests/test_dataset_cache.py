"""prepare-dataset is cached across runs, and a change to the data, the tokenizer, the chat template, the formatting
settings or the task's source code is a cache miss."""

from __future__ import annotations

import json
import uuid

import pytest

from pipeline_config.schema import DataConfig, ModelConfig, TokenizerConfig, TrainingConfig
from qlora import data as data_module
from qlora import prepare
from qlora.model_source import resolve_model_source
from qlora.tokenizer import setup_tokenizer
from tasks.dataset import prepare_dataset_task

# Calling the task outside a flow (as here) makes Prefect warn that its logs have no flow run to go to.
pytestmark = pytest.mark.filterwarnings("ignore:Logger .prefect.task_runs. attempted")


@pytest.fixture
def setup(prefect_server, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "cache")
    path = tmp_path / "rows.jsonl"
    nonce = uuid.uuid4().hex  # never seen by an earlier test session's cache
    rows = [{"prompt": f"q{i} {nonce}", "completion": f"a{i}"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = resolve_model_source(ModelConfig(name_or_path=str(tiny_llama_dir)))
    tokenizer = setup_tokenizer(source, TokenizerConfig(), False)
    return DataConfig(source=str(path), eval_fraction=0.2), tokenizer, TrainingConfig(), path


def _state(cfg, tokenizer, train_cfg):
    return prepare_dataset_task(cfg, tokenizer, train_cfg, return_state=True)


def test_cache_hit_then_every_input_invalidates(setup, monkeypatch):
    cfg, tokenizer, train_cfg, path = setup
    first = _state(cfg, tokenizer, train_cfg)
    assert first.is_completed() and first.name != "Cached"
    again = _state(cfg, tokenizer, train_cfg)
    assert again.name == "Cached"
    ref = again.result()
    splits = prepare.open_prepared(ref, cfg)
    assert len(splits.train) == 8 and len(splits.eval) == 2 and splits.train.cache_files  # file-backed rows

    def misses(*args) -> bool:
        state = _state(*args)
        assert state.is_completed()
        return state.name != "Cached"

    assert misses(cfg.model_copy(update={"system_prompt": "Be brief."}), tokenizer, train_cfg)  # formatting
    assert misses(cfg, tokenizer, train_cfg.model_copy(update={"max_seq_length": 64}))  # formatting (length)
    templated = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    templated.pad_token = tokenizer.pad_token
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert misses(cfg, templated, train_cfg)  # chat template
    grown = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    grown.pad_token = tokenizer.pad_token
    grown.add_tokens(["<order_id>"])
    assert misses(cfg, grown, train_cfg)  # tokenizer vocabulary
    with path.open("a") as fh:
        fh.write(json.dumps({"prompt": "new", "completion": "row"}) + "\n")
    assert misses(cfg, tokenizer, train_cfg)  # data content
    assert not misses(cfg, tokenizer, train_cfg)

    original = data_module.format_rows

    def format_rows(ds, fmt, data_cfg, where):  # same behaviour, different source code
        return original(ds, fmt, data_cfg, where)

    monkeypatch.setattr(data_module, "format_rows", format_rows)
    assert misses(cfg, tokenizer, train_cfg)  # task source


def test_deleted_cache_folder_is_rebuilt(setup):
    import shutil
    from pathlib import Path

    cfg, tokenizer, train_cfg, _ = setup
    ref = _state(cfg, tokenizer, train_cfg).result()
    shutil.rmtree(ref.folder)
    hit = _state(cfg, tokenizer, train_cfg)
    assert hit.name == "Cached"
    splits = prepare.open_prepared(hit.result(), cfg)
    assert Path(ref.folder).is_dir() and len(splits.train) == 8


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, msg, *args) -> None:
        self.lines.append(msg % args)


def test_the_cache_record_pins_no_folder_a_run_elsewhere_builds_its_own(setup, tmp_path, monkeypatch):
    """The record Prefect caches names a key, not the folder of the run that built it: after that folder is moved
    away, a run in another working folder gets the cache hit and builds the prepared rows under its own cache."""
    import shutil

    cfg, tokenizer, train_cfg, _ = setup
    ref = _state(cfg, tokenizer, train_cfg).result()
    built_first = ref.folder
    shutil.move(str(built_first), str(tmp_path / "moved-away"))
    monkeypatch.setattr(prepare, "CACHE_DIR", tmp_path / "elsewhere" / ".cache" / "datasets")
    hit = _state(cfg, tokenizer, train_cfg)
    assert hit.name == "Cached" and "folder" not in vars(hit.result())
    log = _Log()
    splits = prepare.open_prepared(hit.result(), cfg, log)
    assert len(splits.train) == 8
    assert hit.result().folder == (tmp_path / "elsewhere" / ".cache" / "datasets" / ref.key).resolve()
    assert log.lines == [f"prepared dataset {hit.result().folder} is missing: rebuilding it from {cfg.source}"]


def test_a_truncated_arrow_file_is_rebuilt_and_the_log_says_which(setup):
    cfg, tokenizer, train_cfg, _ = setup
    ref = _state(cfg, tokenizer, train_cfg).result()
    (arrow,) = (ref.folder / "train").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    log = _Log()
    splits = prepare.open_prepared(ref, cfg, log)
    assert len(splits.train) == 8 and splits.train[0]["prompt"].startswith("q")
    assert log.lines == [
        f"prepared dataset {ref.folder}/train/{arrow.name} is damaged (missing or sha256 mismatch): rebuilding it "
        f"from {cfg.source}"
    ]
    assert prepare.open_prepared(ref, cfg, log) and len(log.lines) == 1  # intact again: no second rebuild
