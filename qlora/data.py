"""Load the dataset (train + held-out split) and bring every row to one of TRL's formats.

Sources: the bundled generator ('bundled:orders'), local jsonl/json/csv/parquet files, or a hub dataset id.
Formats in: `messages`, `text`, alpaca (`instruction`/`input`/`output`), `prompt`/`completion`; for the stages
after SFT `preference` (`prompt`/`chosen`/`rejected`, DPO), `unpaired_preference` (`prompt`/`completion`/`label`,
KTO) and `prompt_only` (`prompt` and what the rewards read, GRPO).
Formats out (what TRL's trainers consume natively): `messages` (alpaca rows become chats), `text`,
`prompt`/`completion`, and the three stage formats under TRL's column names (a chat prompt's answers become
assistant turns).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from pipeline_config.schema import DataConfig
from qlora.bundled_data import generate_orders
from qlora.errors import DataError

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUNDLED_PREFIX = "bundled:"


@dataclass
class DatasetSplits:
    """Formatted train and held-out rows, their format and a content digest."""

    train: datasets.Dataset
    eval: datasets.Dataset
    kind: str  # 'messages' | 'text' | 'prompt_completion'
    digest: str
    source: str
    response_template: str | None = None

    @property
    def is_conversational(self) -> bool:
        if self.kind in STAGE_KINDS:
            return len(self.train) > 0 and isinstance(self.train[0]["prompt"], list)
        return self.kind == "messages"


def _not_text(path: Path, data: bytes, error: UnicodeDecodeError, offset: int = 0) -> DataError:
    return DataError(
        f"data file {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {offset + error.start}): "
        f"a {path.suffix} file must be UTF-8 text; check data.source or convert the file"
    )


def text_lines(path: Path) -> Iterator[str]:
    """The file's lines, decoded as UTF-8. Raises DataError naming the file and the first byte that is not UTF-8."""
    offset = 0
    with path.open("rb") as fh:
        for raw in fh:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_text(path, raw, exc, offset) from None
            offset += len(raw)


def json_lines(path: Path, not_json: Callable[[int, str], Exception]) -> Iterator[tuple[int, object]]:
    """The non-blank lines of a JSON Lines file, parsed, each with its line number (from 1). A line that is not JSON
    raises `not_json(line number, the parser's reason)`; a byte that is not UTF-8 raises DataError (text_lines)."""
    for number, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise not_json(number, exc.msg) from None
        yield number, value


def _row_count(path: Path) -> int | None:
    """Rows in a local file, read cheaply, so an empty or unreadable file gets a clear message (datasets fails
    obscurely). Raises DataError when the file is not UTF-8 text (.jsonl/.json/.csv) or not Parquet (.parquet)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return sum(1 for line in text_lines(path) if line.strip())
    if suffix == ".json":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_text(path, data, exc) from None
        try:
            obj = json.loads(text or "[]")
        except json.JSONDecodeError:
            return None
        return len(obj) if isinstance(obj, list) else None
    if suffix == ".csv":
        return max(sum(1 for line in text_lines(path) if line.strip()) - 1, 0)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).split(". ")[0].rstrip(".")  # arrow's first sentence says what is wrong; the rest guesses
        raise DataError(
            f"data file {path} is not a valid Parquet file ({reason}): pass a Parquet file, or name the file after "
            "its real type (.jsonl, .json, .csv)"
        ) from None


def _read_source(source: str, cfg: DataConfig, role: str = "training") -> datasets.DatasetDict:
    if source.startswith(BUNDLED_PREFIX):
        name = source.removeprefix(BUNDLED_PREFIX)
        if name != "orders":
            raise DataError(f"data.source: unknown bundled dataset {name!r}; the bundled one is 'bundled:orders'")
        rows = generate_orders(cfg.bundled_train_rows, cfg.bundled_eval_rows, cfg.seed)
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})
    path = Path(source)
    if path.suffix.lower() in LOCAL_BUILDERS or path.exists():
        if not path.is_file():
            raise DataError(f"data file {source} not found: check data.source (path is relative to the working folder)")
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"data file {source}: unsupported type; use .jsonl, .json, .csv or .parquet")
        if _row_count(path) == 0:
            raise DataError(f"data file {source} has no rows: the {role} split is empty")
        if path.suffix.lower() == ".jsonl":
            _check_jsonl(path)
        try:
            return datasets.load_dataset(builder, data_files={"train": str(path)})
        except Exception as exc:  # datasets wraps parser errors in several types
            raise DataError(f"data file {source} could not be read as {builder}: {exc}") from None
    try:
        return datasets.load_dataset(source)
    except Exception as exc:
        raise DataError(
            f"data.source {source!r}: could not load it from the hub ({type(exc).__name__}). Without network access "
            "use a local .jsonl/.json/.csv/.parquet file instead."
        ) from None


def _check_jsonl(path: Path) -> None:
    """Name the first malformed line, which the json builder does not."""

    def not_json(lineno: int, reason: str) -> DataError:
        return DataError(f"{path}: line {lineno} is not valid JSON ({reason}): fix or remove that line")

    for lineno, obj in json_lines(path, not_json):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object")


def detect_format(columns: list[str], cfg: DataConfig) -> str:
    c = cfg.columns
    if cfg.format != "auto":
        return cfg.format
    if c.messages in columns:
        return "messages"
    if c.chosen in columns and c.rejected in columns:
        return "preference"
    if c.prompt in columns and c.completion in columns and c.label in columns:
        return "unpaired_preference"
    if c.prompt in columns and c.completion in columns:
        return "prompt_completion"
    if c.instruction in columns and c.output in columns:
        return "alpaca"
    if c.text in columns:
        return "text"
    raise DataError(
        f"data: cannot tell the format from columns {sorted(columns)}; set data.format and data.columns "
        "(messages / text / alpaca / prompt_completion / preference / unpaired_preference / prompt_only)"
    )


REQUIRED_COLUMNS = {
    "messages": ("messages",),
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_only": ("prompt",),
}
STAGE_KINDS = ("preference", "unpaired_preference", "prompt_only")


def _kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_cell_types(ds: datasets.Dataset, fmt: str, cfg: DataConfig, where: str) -> None:
    """Every cell the format reads holds text (a chat turn's content too): a null, a number or a list would fail
    deep inside tokenization. Raises DataError naming the first bad row (1-based, in file order) and column."""
    c = cfg.columns
    if fmt in STAGE_KINDS:
        check_stage_cells(ds, fmt, cfg, where)
        return
    text_fields = {
        "text": ("text",),
        "prompt_completion": ("prompt", "completion"),
        "alpaca": ("instruction", "output"),
        "messages": (),
    }[fmt]
    for field in text_fields:
        col = getattr(c, field)
        if col not in ds.column_names:
            continue  # format_rows names the missing column
        for i, value in enumerate(ds[col], 1):
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: row {i}, column {col!r} (data.columns.{field}) is {_kind_of(value)}, not text: fix or "
                    "remove that row"
                )
    if fmt == "alpaca" and c.input in ds.column_names:
        for i, value in enumerate(ds[c.input], 1):
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: row {i}, column {c.input!r} is {_kind_of(value)}, not text or null")
    if fmt == "messages" and c.messages in ds.column_names:
        for i, turns in enumerate(ds[c.messages], 1):
            if not isinstance(turns, list) or not turns:
                raise DataError(f"{where}: row {i}, column {c.messages!r} is {_kind_of(turns)}, not a list of turns")
            for n, turn in enumerate(turns, 1):
                if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
                    raise DataError(f"{where}: row {i}, turn {n} is not a {{role, content}} object")
                if not isinstance(turn.get("content"), str):
                    raise DataError(
                        f"{where}: row {i}, turn {n} ({turn['role']}): content is {_kind_of(turn.get('content'))}, "
                        "not text: fix or remove that row"
                    )


def _turns_problem(value, allow_text: bool) -> str | None:
    """Why `value` is neither text (when allowed) nor a non-empty list of {role, content} turns with text content."""
    if isinstance(value, str):
        return None if allow_text else "text, not a list of chat turns"
    if not isinstance(value, list) or not value:
        return f"{_kind_of(value)}, not {'text or ' if allow_text else ''}a list of chat turns"
    for n, turn in enumerate(value, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            return f"turn {n} is not a {{role, content}} object"
        if not isinstance(turn.get("content"), str):
            return f"turn {n} ({turn['role']}): content is {_kind_of(turn.get('content'))}, not text"
    return None


def check_stage_cells(ds: datasets.Dataset, fmt: str, cfg: DataConfig, where: str) -> None:
    """Preference / unpaired / prompt-only rows: a prompt is text or chat turns, every answer text or chat turns of
    the same kind as its prompt (a chat prompt may have text answers: they become assistant turns), a label a
    boolean. Raises DataError naming the first bad row (1-based, in file order) and column."""
    c = cfg.columns
    answers = {"preference": ("chosen", "rejected"), "unpaired_preference": ("completion",), "prompt_only": ()}[fmt]
    columns = [(f, getattr(c, f)) for f in ("prompt", *answers) if getattr(c, f) in ds.column_names]
    label = c.label if fmt == "unpaired_preference" and c.label in ds.column_names else None
    for i, row in enumerate(ds, 1):
        for field, col in columns:
            if problem := _turns_problem(row[col], allow_text=True):
                raise DataError(
                    f"{where}: row {i}, column {col!r} (data.columns.{field}) is {problem}: fix or remove that row"
                )
        if columns and columns[0][0] == "prompt" and isinstance(row[columns[0][1]], str):
            for field, col in columns[1:]:
                if not isinstance(row[col], str):
                    raise DataError(
                        f"{where}: row {i}, column {col!r} (data.columns.{field}) is chat turns but its prompt is "
                        "text: give both as text, or the prompt as chat turns"
                    )
        if label and not isinstance(row[label], bool):
            raise DataError(
                f"{where}: row {i}, column {label!r} (data.columns.label) is {_kind_of(row[label])}, not true/false: "
                "fix or remove that row"
            )


def _as_assistant_turns(prompt, answer):
    """A text answer to a chat prompt, as the assistant turn TRL's conversational format expects."""
    if isinstance(prompt, list) and isinstance(answer, str):
        return [{"role": "assistant", "content": answer}]
    return answer


def _stage_rows(ds: datasets.Dataset, fmt: str, cfg: DataConfig) -> datasets.Dataset:
    """A stage format under TRL's column names; a prompt_only row keeps its other columns (rewards read them)."""
    c = cfg.columns
    names = {"prompt": c.prompt}
    if fmt == "preference":
        names |= {"chosen": c.chosen, "rejected": c.rejected}
    elif fmt == "unpaired_preference":
        names |= {"completion": c.completion, "label": c.label}
    elif c.answer in ds.column_names:
        names |= {"answer": c.answer}
    answers = [k for k in ("chosen", "rejected", "completion") if k in names]

    def to_trl(row: dict) -> dict:
        out = {new: row[old] for new, old in names.items()}
        for key in answers:
            out[key] = _as_assistant_turns(out["prompt"], out[key])
        return out

    keep = [col for col in ds.column_names if col not in names.values()] if fmt == "prompt_only" else []
    drop = [col for col in ds.column_names if col not in keep]
    return ds.map(to_trl, remove_columns=drop)


def format_rows(ds: datasets.Dataset, fmt: str, cfg: DataConfig, where: str) -> tuple[datasets.Dataset, str]:
    """Rename/convert columns into one of TRL's formats; returns (dataset, kind)."""
    c = cfg.columns
    for field in REQUIRED_COLUMNS[fmt]:
        col = getattr(c, field)
        if col not in ds.column_names:
            raise DataError(
                f"{where}: column {col!r} (data.columns.{field}) missing for format {fmt!r}; "
                f"available columns: {', '.join(ds.column_names)}"
            )
    if fmt == "messages":
        out = ds.select_columns([c.messages]).rename_columns(
            {c.messages: "messages"} if c.messages != "messages" else {}
        )
        for i, row in enumerate(out["messages"]):
            if not row or not all(isinstance(t, dict) and {"role", "content"} <= set(t) for t in row):
                raise DataError(f"{where}: row {i} column {c.messages!r} is not a list of {{role, content}} turns")
            if row[-1]["role"] != "assistant":
                raise DataError(f"{where}: row {i} does not end with an assistant turn")
        return out, "messages"
    if fmt in STAGE_KINDS:
        return _stage_rows(ds, fmt, cfg), fmt
    if fmt == "text":
        out = ds.select_columns([c.text]).rename_columns({c.text: "text"} if c.text != "text" else {})
        return out, "text"
    if fmt == "prompt_completion":
        out = ds.select_columns([c.prompt, c.completion]).rename_columns(
            {k: v for k, v in {c.prompt: "prompt", c.completion: "completion"}.items() if k != v}
        )
        return out, "prompt_completion"
    # alpaca -> chat turns
    system = cfg.system_prompt
    has_input = c.input in ds.column_names

    def to_chat(row: dict) -> dict:
        user = row[c.instruction] if not (has_input and row[c.input]) else f"{row[c.instruction]}\n\n{row[c.input]}"
        turns = [{"role": "system", "content": system}] if system else []
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": row[c.output]}]
        return {"messages": turns}

    return ds.map(to_chat, remove_columns=ds.column_names), "messages"


def digest_rows(*splits: datasets.Dataset) -> str:
    """sha256 of the formatted rows (order-sensitive), shortened to 16 hex digits."""
    h = hashlib.sha256()
    for ds in splits:
        for row in ds:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
        h.update(b"--split--")
    return h.hexdigest()[:16]


def _row_key(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def held_out_overlap(data: DatasetSplits) -> tuple[int, int]:
    """(held-out rows that are also training rows, held-out rows): a held-out score over rows the model trained on
    measures memorization, not the task."""
    train_keys = {_row_key(row) for row in data.train}
    shared = sum(_row_key(row) in train_keys for row in data.eval)
    return shared, len(data.eval)


def load_dataset_splits(cfg: DataConfig) -> DatasetSplits:
    """Read the source, pick/carve the held-out split, format both, and digest them. Raises DataError."""
    raw = _read_source(cfg.source, cfg)
    if cfg.train_split not in raw:
        raise DataError(f"data.train_split {cfg.train_split!r} not in {cfg.source}; splits: {', '.join(raw)}")
    train = raw[cfg.train_split]
    fmt = detect_format(train.column_names, cfg)
    check_cell_types(train, fmt, cfg, cfg.source)  # before any shuffle: row numbers are the file's
    if cfg.eval_source:
        eval_raw = _read_source(cfg.eval_source, cfg, role="held-out")
        eval_ds = eval_raw[cfg.eval_split or next(iter(eval_raw))]
        check_cell_types(eval_ds, fmt, cfg, cfg.eval_source)
    elif cfg.eval_split or (cfg.source.startswith(BUNDLED_PREFIX)):
        split = cfg.eval_split or "test"
        if split not in raw:
            raise DataError(f"data.eval_split {split!r} not in {cfg.source}; splits: {', '.join(raw)}")
        eval_ds = raw[split]
        check_cell_types(eval_ds, fmt, cfg, f"{cfg.source} ({split} split)")
    else:
        if len(train) < 2:
            raise DataError(f"{cfg.source}: {len(train)} row(s); need at least 2 to hold some out")
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, eval_ds = parts["train"], parts["test"]
    if len(train) == 0:
        raise DataError(f"{cfg.source}: the training split is empty")
    if len(eval_ds) == 0:
        raise DataError(f"{cfg.eval_source or cfg.source}: the held-out split is empty")
    train, kind = format_rows(train, fmt, cfg, cfg.source)
    eval_ds, _ = format_rows(eval_ds, fmt, cfg, cfg.eval_source or cfg.source)
    if cfg.max_train_rows:
        train = train.select(range(min(cfg.max_train_rows, len(train))))
    if cfg.max_eval_rows:
        eval_ds = eval_ds.select(range(min(cfg.max_eval_rows, len(eval_ds))))
    return DatasetSplits(
        train=train,
        eval=eval_ds,
        kind=kind,
        digest=digest_rows(train, eval_ds),
        source=cfg.source,
        response_template=cfg.response_template,
    )


def eval_prompt_and_reference(row: dict, kind: str, response_template: str | None):
    """Split a held-out row into (prompt, reference answer): a chat list or a string prompt. A stage's row: the
    chosen answer, a completion labelled desirable, or the expected answer; (None, None) when it has none."""
    if kind == "messages":
        return row["messages"][:-1], row["messages"][-1]["content"]
    if kind == "prompt_completion":
        return row["prompt"], row["completion"]
    if kind in STAGE_KINDS:
        answer = {"preference": row.get("chosen"), "unpaired_preference": row.get("completion")}.get(kind)
        if kind == "unpaired_preference" and not row.get("label"):
            answer = None
        if kind == "prompt_only":
            answer = row.get("answer")
            answer = answer if answer is None or isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
        if isinstance(answer, list):
            answer = answer[-1]["content"]
        return (row["prompt"], answer) if answer is not None else (None, None)
    text = row["text"]
    if not response_template or response_template not in text:
        return None, None
    head, _, tail = text.partition(response_template)
    return head + response_template, tail
