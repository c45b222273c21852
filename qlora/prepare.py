"""Load + format the dataset as the flow runs it: cached across flow runs (step `prepare-dataset`).

Cache key (Prefect `cache_key_fn`): the source data's content digest, the tokenizer (name and vocabulary digest),
its chat template, the formatting settings (`data` section and `training.max_seq_length`) and the source code of
the loading/formatting functions; a change to any of them is a cache miss. The prepared splits are saved as Arrow
files under `.cache/datasets/<key>/`; the cached Prefect result is only a small reference to that folder
(`PreparedDataset`), opened by `open-prepared-dataset`, which rebuilds the folder if it was deleted. Because the rows
are file-backed, the tokenization SFTTrainer runs on them is itself cached by `datasets` (its fingerprint covers
the rows, the tokenizer and TRL's tokenize function). Models are never cached or persisted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import datasets

from pipeline_config.schema import DataConfig, TrainingConfig
from qlora import bundled_data
from qlora import data as data_module
from qlora.data import BUNDLED_PREFIX, DatasetSplits, load_dataset_splits
from qlora.files import atomic_folder
from qlora.model_source import file_digest

CACHE_DIR = Path(".cache/datasets")
# Functions whose source decides what the prepared rows look like.
SOURCE_FUNCTIONS = ("load_dataset_splits", "_read_source", "format_rows", "detect_format", "digest_rows")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_content_digest(cfg: DataConfig) -> str:
    """Digest of the raw data without parsing it: file bytes, bundled generator settings, or hub id."""
    parts = []
    for source in filter(None, (cfg.source, cfg.eval_source)):
        path = Path(source)
        if source.startswith(BUNDLED_PREFIX):
            parts.append(f"{source}|{cfg.bundled_train_rows}|{cfg.bundled_eval_rows}|{cfg.seed}")
            parts.append(inspect.getsource(bundled_data))
        elif path.is_file():
            parts.append(file_digest(path))
        else:  # hub dataset: its id (a revision pin would go here); retries fetch the same files
            parts.append(f"hub:{source}")
    return _sha("\n".join(parts))


def task_source_digest() -> str:
    return _sha("\n".join(inspect.getsource(getattr(data_module, name)) for name in SOURCE_FUNCTIONS))


def tokenizer_digest(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(
        f"{tokenizer.name_or_path}|{type(tokenizer).__name__}|{vocab}|{tokenizer.eos_token}|{tokenizer.pad_token}"
    )


def dataset_cache_key(context, parameters: dict) -> str:
    cfg: DataConfig = parameters["cfg"]
    tokenizer = parameters["tokenizer"]
    train_cfg: TrainingConfig = parameters["train_cfg"]
    parts = {
        "data": source_content_digest(cfg),
        "tokenizer": tokenizer_digest(tokenizer),
        "chat_template": tokenizer.chat_template or "",
        "formatting": json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + f"|{train_cfg.max_seq_length}",
        "task_source": task_source_digest(),
    }
    return "prepared-dataset-" + _sha(json.dumps(parts, sort_keys=True))[:32]


@dataclass
class PreparedDataset:
    """What the cache stores: where the prepared Arrow splits are, and their metadata (no rows, no models)."""

    folder: str
    kind: str
    digest: str
    source: str
    response_template: str | None


def prepare_dataset(cfg: DataConfig, cache_key: str) -> PreparedDataset:
    """Load + format, then save both splits as Arrow under the cache folder (atomically)."""
    from filelock import FileLock

    splits = load_dataset_splits(cfg)
    target = CACHE_DIR.resolve() / cache_key
    target.parent.mkdir(parents=True, exist_ok=True)
    # Runs that start together prepare the same key at once: one builds, the others wait and reuse its folder. An
    # OS file lock, so a crashed builder never blocks; the folder itself still appears only complete (rename).
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():
            with atomic_folder(target) as tmp:
                splits.train.save_to_disk(str(tmp / "train"))
                splits.eval.save_to_disk(str(tmp / "eval"))
    return PreparedDataset(str(target), splits.kind, splits.digest, splits.source, splits.response_template)


def open_prepared(ref: PreparedDataset, cfg: DataConfig) -> DatasetSplits:
    """The prepared splits, memory-mapped from the cache folder (rebuilt first if someone deleted it)."""
    folder = Path(ref.folder)
    if not folder.is_dir():
        ref = prepare_dataset(cfg, folder.name)
    return DatasetSplits(
        train=datasets.load_from_disk(str(folder / "train")),
        eval=datasets.load_from_disk(str(folder / "eval")),
        kind=ref.kind,
        digest=ref.digest,
        source=ref.source,
        response_template=ref.response_template,
    )
