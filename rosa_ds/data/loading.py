"""Load a dataset (bundled generator, local file or hub id) into training records.

Every source is converted to one of three record shapes: a single turn (``prompt`` and
``response``, what is trained; ``reference``, what the metric compares with; for SQL ``setup``,
the SQL that builds the table the queries run on), a conversation (``messages``: role/content
turns, every assistant turn trained) or plain ``text`` (every token trained). Known schemas:
``prompt_response``, ``gsm8k`` (GSM8K: question, answer ending in ``#### N``),
``sql_context`` (sql-create-context: question, context, answer), ``alpaca`` (instruction,
optional input, output), ``messages`` (OpenAI ``messages`` or ShareGPT ``conversations`` with
from/value turns) and ``text``. ``data.columns`` renames fields first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosa_ds.config import DataConfig
from rosa_ds.data.tasks import GENERATORS, generate
from rosa_ds.errors import UserError

FORMAT_FIELDS = {
    "prompt_response": ("prompt", "response"),
    "gsm8k": ("question", "answer"),
    "sql_context": ("question", "context", "answer"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "text": ("text",),
}
FORMAT_METRIC = {"prompt_response": "none", "gsm8k": "number_match", "sql_context": "sql_execution",
                 "alpaca": "none", "messages": "none", "text": "none"}  # fmt: skip
DETECT_ORDER = ("sql_context", "prompt_response", "gsm8k", "alpaca", "messages", "text")
# ShareGPT's speakers and other common spellings, as the chat templates name the roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "system": "system"}  # fmt: skip
GENERATOR_FORMAT = {"arithmetic": "gsm8k", "multistep": "gsm8k", "sql": "sql_context"}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                 ".arrow": "arrow"}  # fmt: skip


@dataclass
class TaskData:
    """Train and held-out records in one schema, with the metric that scores them."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    format: str
    metric: str
    detected_from: list[str] | None = None  # the fields ``data.format: auto`` read

    def describe(self) -> str | None:
        """What ``auto`` detected, for the run's log (None when the format was given)."""
        if self.detected_from is None:
            return None
        return f"data.format auto: {self.format} (fields {', '.join(self.detected_from)})"


def sql_prompt(question: str, context: str) -> str:
    return f"Given the table:\n{context}\nWrite a SQLite query that answers: {question}"


def conversation(turns: Any, where: str) -> list[dict[str, str]]:
    """OpenAI (role/content) or ShareGPT (from/value) turns as role/content with the roles a
    chat template knows; at least one assistant turn."""
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: messages must be a non-empty list of turns")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: turn {j} must be a mapping with role and content")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        mapped = ROLES.get(str(role).lower()) if role is not None else None
        if mapped is None:
            raise UserError(
                f"{where}: turn {j} has role {role!r}; use one of system, user, assistant "
                "(or ShareGPT's human, gpt)"
            )
        if not isinstance(content, str):
            raise UserError(f"{where}: turn {j} content must be text, got {type(content).__name__}")
        out.append({"role": mapped, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise UserError(f"{where}: no assistant turn, so nothing to train; add one")
    return out


def to_record(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "alpaca":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"prompt": prompt, "response": row["output"], "reference": row["output"]}
    if fmt == "messages":
        turns = conversation(row["messages"], "record")
        last = next(t["content"] for t in reversed(turns) if t["role"] == "assistant")
        return {"messages": turns, "reference": last}
    if fmt == "text":
        return {"text": row["text"], "reference": ""}
    if fmt == "prompt_response":
        return {"prompt": row["prompt"], "response": row["response"], "reference": row["response"]}
    if fmt == "gsm8k":
        return {"prompt": row["question"], "response": row["answer"], "reference": row["answer"]}
    if fmt == "sql_context":
        return {
            "prompt": sql_prompt(row["question"], row["context"]),
            "response": row["answer"],
            "reference": row["answer"],
            "setup": row.get("setup") or row["context"],
        }
    raise ValueError(fmt)


def detect_format(columns: list[str], source: str) -> str:
    for fmt in DETECT_ORDER:
        if all(c in columns for c in FORMAT_FIELDS[fmt]):
            return fmt
    raise UserError(
        f"dataset {source} has fields {sorted(columns)}, which match no known format; "
        "give it prompt+response, question+answer (gsm8k), question+context+answer "
        "(sql_context), instruction+output (alpaca), messages or conversations, or text "
        "fields, rename yours with data.columns, or set data.format"
    )


def rename_columns(rows: list[dict[str, Any]], columns: dict[str, str]) -> list[dict[str, Any]]:
    """``data.columns`` (source field -> the field a format reads); ShareGPT's
    ``conversations`` is ``messages``."""
    mapping = {"conversations": "messages", **columns}
    if not any(k in row for row in rows[:1] for k in mapping):
        return rows
    return [{mapping.get(k, k): v for k, v in row.items()} for row in rows]


def _check_rows(rows: list[dict[str, Any]], fmt: str, source: str, split: str) -> None:
    if not rows:
        raise UserError(
            f"dataset {source} has no examples in split {split}; "
            "give a dataset with at least one record"
        )
    needed = FORMAT_FIELDS[fmt]
    for i, row in enumerate(rows):
        if fmt == "messages":
            conversation(row.get("messages"), f"dataset {source} record {i} of split {split}")
            continue
        for name in needed:
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                what = "lacks" if name not in row or value is None else "has an empty"
                raise UserError(
                    f"dataset {source} record {i} of split {split} {what} field "
                    f"{name!r} (format {fmt} needs {', '.join(needed)}); fix the "
                    "data or set data.format"
                )
            if not isinstance(value, str):
                raise UserError(
                    f"dataset {source} record {i} field {name!r} must be text, "
                    f"got {type(value).__name__}"
                )


def _local_files(path: Path) -> dict[str, list[str]]:
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise UserError(f"dataset file {path} must be .json, .jsonl, .parquet, .csv or .arrow")
        return {"train": [str(path)]}
    files: dict[str, list[str]] = {}
    for f in sorted(path.iterdir()):
        if f.suffix in FILE_BUILDERS:
            split = f.stem.split("-")[0].split(".")[0]
            files.setdefault(split, []).append(str(f))
    if not files:
        raise UserError(
            f"dataset folder {path} has no .json, .jsonl, .parquet, .csv or .arrow files"
        )
    return files


def _load_splits(cfg: DataConfig) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """Rows per split, read with ``datasets`` from a local path or the hub."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(cfg.dataset).expanduser()
    try:
        if path.exists():
            files = _local_files(path)
            builder = FILE_BUILDERS[Path(next(iter(files.values()))[0]).suffix]
            loaded = datasets.load_dataset(builder, data_files=files)
        elif cfg.dataset.startswith((".", "/", "~")) or cfg.dataset.endswith(tuple(FILE_BUILDERS)):
            raise UserError(
                f"dataset {cfg.dataset} does not exist; set data.dataset to a file, "
                f"a folder, a hub id or one of: {', '.join(GENERATORS)}"
            )
        else:
            loaded = datasets.load_dataset(cfg.dataset, cfg.subset)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable or missing data
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"dataset {cfg.dataset} cannot be loaded ({first}); check the path, "
            "the file's contents, or go online for hub ids"
        ) from None
    return {name: list(split) for name, split in loaded.items()}, cfg.dataset


GENERATED_SPLITS = ("test", "validation")


def generated_heldout(cfg: DataConfig, seen: set[str]) -> list[dict[str, str]]:
    """``data.num_eval`` held-out problems of a generator, none of them a training problem:
    ``test`` (the default) and ``validation`` are drawn with their own seeds and never share a
    problem either, so hyperparameters chosen on one are reported on the other."""
    split = cfg.eval_split or "test"
    if split not in GENERATED_SPLITS:
        raise UserError(
            f"data.eval_split={split} is not a split of the {cfg.dataset} generator; use "
            f"{' or '.join(GENERATED_SPLITS)}"
        )

    def draw(offset: int, exclude: set[str]) -> list[dict[str, str]]:
        rows = generate(cfg.dataset, cfg.num_eval * 4, cfg.seed + offset, cfg.difficulty)
        return [r for r in rows if r["question"] not in exclude][: cfg.num_eval]

    test = draw(1, seen)
    if split == "test":
        return test
    return draw(2, seen | {r["question"] for r in test})


def load_task_data(cfg: DataConfig) -> TaskData:
    """Train and held-out records plus the format and the metric that scores them."""
    if cfg.dataset in GENERATORS:
        fmt = GENERATOR_FORMAT[cfg.dataset]
        train_rows = generate(cfg.dataset, cfg.num_train, cfg.seed, cfg.difficulty)
        eval_rows = generated_heldout(cfg, {r["question"] for r in train_rows})
        source = f"generator {cfg.dataset}"
        detected = False
    else:
        splits, source = _load_splits(cfg)
        if cfg.train_split not in splits:
            raise UserError(
                f"dataset {source} has no split {cfg.train_split!r} (it has "
                f"{', '.join(splits)}); set data.train_split"
            )
        train_rows = rename_columns(splits[cfg.train_split], cfg.columns)
        columns = sorted({k for row in train_rows[:100] for k in row})
        fmt = cfg.format if cfg.format != "auto" else detect_format(columns, source)
        detected = cfg.format == "auto"
        if cfg.eval_split and cfg.eval_split in splits:
            eval_rows = rename_columns(splits[cfg.eval_split], cfg.columns)
        else:
            order = list(range(len(train_rows)))
            random.Random(cfg.seed).shuffle(order)
            n_eval = max(1, round(cfg.eval_fraction * len(order))) if len(order) > 1 else 0
            eval_rows = [train_rows[i] for i in order[:n_eval]]
            train_rows = [train_rows[i] for i in order[n_eval:]]
        if eval_rows:
            _check_rows(eval_rows, fmt, source, cfg.eval_split or "held-out")
    _check_rows(train_rows, fmt, source, cfg.train_split)
    metric = cfg.metric if cfg.metric != "auto" else FORMAT_METRIC[fmt]
    return TaskData(
        train=[to_record(r, fmt) for r in train_rows],
        eval=[to_record(r, fmt) for r in eval_rows],
        format=fmt,
        metric=metric,
        detected_from=columns if detected else None,
    )
