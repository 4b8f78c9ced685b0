"""Load a dataset (bundled generator, local file or hub id) into prompt/response records.

Every source is converted to one record schema: ``prompt`` and ``response`` (what is trained),
``reference`` (what the metric compares with) and, for SQL, ``setup`` (the SQL that builds the
table the queries run on). Known schemas: ``prompt_response``, ``gsm8k`` (GSM8K:
question, answer ending in ``#### N``) and ``sql_context`` (sql-create-context: question,
context, answer).
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
}
FORMAT_METRIC = {"prompt_response": "none", "gsm8k": "number_match", "sql_context": "sql_execution"}
GENERATOR_FORMAT = {"arithmetic": "gsm8k", "multistep": "gsm8k", "sql": "sql_context"}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskData:
    """Train and held-out records in one schema, with the metric that scores them."""

    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    format: str
    metric: str


def sql_prompt(question: str, context: str) -> str:
    return f"Given the table:\n{context}\nWrite a SQLite query that answers: {question}"


def to_record(row: dict[str, Any], fmt: str) -> dict[str, str]:
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
    for fmt in ("sql_context", "prompt_response", "gsm8k"):
        if all(c in columns for c in FORMAT_FIELDS[fmt]):
            return fmt
    raise UserError(
        f"dataset {source} has fields {sorted(columns)}, which match no known format; "
        "give it prompt+response, question+answer (gsm8k) or question+context+answer "
        "(sql_context) fields, or set data.format"
    )


def _check_rows(rows: list[dict[str, Any]], fmt: str, source: str, split: str) -> None:
    if not rows:
        raise UserError(
            f"dataset {source} has no examples in split {split}; "
            "give a dataset with at least one record"
        )
    needed = FORMAT_FIELDS[fmt]
    for i, row in enumerate(rows):
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
            raise UserError(f"dataset file {path} must be .json, .jsonl or .parquet")
        return {"train": [str(path)]}
    files: dict[str, list[str]] = {}
    for f in sorted(path.iterdir()):
        if f.suffix in FILE_BUILDERS:
            split = f.stem.split("-")[0].split(".")[0]
            files.setdefault(split, []).append(str(f))
    if not files:
        raise UserError(f"dataset folder {path} has no .json, .jsonl or .parquet files")
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
    else:
        splits, source = _load_splits(cfg)
        if cfg.train_split not in splits:
            raise UserError(
                f"dataset {source} has no split {cfg.train_split!r} (it has "
                f"{', '.join(splits)}); set data.train_split"
            )
        train_rows = splits[cfg.train_split]
        columns = sorted({k for row in train_rows[:100] for k in row})
        fmt = cfg.format if cfg.format != "auto" else detect_format(columns, source)
        if cfg.eval_split and cfg.eval_split in splits:
            eval_rows = splits[cfg.eval_split]
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
    )
