"""Task metrics scored on generated text: final-number exact match and SQL execution accuracy."""

from __future__ import annotations

import re
import sqlite3
from collections import Counter

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the number after ``####``, else the last number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail if "####" in text else text)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace(",", "")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number == int(number) else str(number)


def number_match(prediction: str, reference: str) -> bool:
    expected = final_number(reference)
    return expected is not None and final_number(prediction) == expected


def extract_sql(text: str) -> str:
    """The first SQL statement of a generation, without code fences or trailing prose."""
    fenced = re.search(r"```(?:sql)?\s*(.*?)```", text, flags=re.S | re.I)
    if fenced:
        text = fenced.group(1)
    return text.strip().split(";")[0].strip().splitlines()[0] if text.strip() else ""


def _run(conn: sqlite3.Connection, sql: str) -> list[tuple]:
    return [
        tuple(round(v, 6) if isinstance(v, float) else v for v in row)
        for row in conn.execute(sql).fetchall()
    ]


def sql_execution_match(prediction: str, reference: str, setup: str) -> bool:
    """Execution accuracy: the predicted query returns the reference's rows on the same table.

    Rows are compared as multisets unless the reference orders them. An empty generation
    scores False, even where the reference returns no rows.
    """
    query = extract_sql(prediction)
    if not query:
        return False
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(setup)
        gold = _run(conn, reference)
        try:
            pred = _run(conn, query)
        except (sqlite3.Error, sqlite3.Warning, ValueError):
            return False
    finally:
        conn.close()
    if "order by" in reference.lower():
        return pred == gold
    return Counter(pred) == Counter(gold)


def score(metric: str, prediction: str, record: dict[str, str]) -> bool:
    if metric == "number_match":
        return number_match(prediction, record["reference"])
    if metric == "sql_execution":
        setup = record.get("setup") or record.get("context", "")
        return sql_execution_match(prediction, record["reference"], setup)
    raise ValueError(f"unknown metric {metric}")
