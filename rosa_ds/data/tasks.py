"""Bundled task generators with a real metric, for machines with no dataset hub.

* ``arithmetic``: GSM8K-style word problems; the answer ends in ``#### N`` and is scored by exact
  match of the final number.
* ``multistep``: the same kind of problem with ``data.difficulty`` operations on a running total
  (default 4), where one or two steps are not enough, so that capacity shows; same metric.
* ``sql``: text-to-SQL over generated sqlite3 tables, in the schema of sql-create-context
  (question, context, answer) plus ``setup``, the SQL that fills the table so that a predicted
  query can be scored by executing it (execution accuracy).
"""

from __future__ import annotations

import random
from collections.abc import Callable

Record = dict[str, str]

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dan",
    "Emma",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Lena",
    "Max",
    "Nora",
    "Omar",
    "Pia",
    "Ravi",
    "Sara",
    "Tom",
    "Uma",
    "Zoe",
]
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "coins",
    "pencils",
    "cookies",
    "cards",
    "shells",
    "stamps",
]


def _arithmetic_problem(rng: random.Random) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 50), rng.randint(2, 30)
    kind = rng.randrange(5)
    if kind == 0:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        steps, ans = f"{a} + {b} = {a + b}", a + b
    elif kind == 1:
        a = a + b
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps, ans = f"{a} - {b} = {a - b}", a - b
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} is that in total?"
        steps, ans = f"{a} * {b} = {a * b}", a * b
    elif kind == 3:
        b = rng.randint(2, 9)
        a = b * rng.randint(2, 12)
        q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each get?"
        steps, ans = f"{a} / {b} = {a // b}", a // b
    else:
        c = rng.randint(1, min(a + b - 1, 20))
        q = (
            f"{name} has {a} {item}, finds {b} more and then loses {c}. "
            f"How many {item} does {name} have?"
        )
        steps, ans = f"{a} + {b} = {a + b}, and {a + b} - {c} = {a + b - c}", a + b - c
    return {"question": q, "answer": f"{steps}.\n#### {ans}"}


TABLES = {
    "employees": {
        "name": ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Gina", "Hank", "Ivy", "Joe"],
        "department": ["sales", "hr", "it", "finance"],
        "salary": (30000, 120000),
        "age": (21, 65),
    },
    "products": {
        "name": ["lamp", "desk", "chair", "mug", "pen", "sofa", "rug", "clock", "vase", "fan"],
        "category": ["home", "office", "kitchen"],
        "price": (1, 500),
        "stock": (0, 200),
    },
    "students": {
        "name": ["Amir", "Bea", "Cole", "Dina", "Eli", "Fay", "Gus", "Hana", "Ian", "Jade"],
        "major": ["math", "physics", "history", "biology"],
        "score": (40, 100),
        "year": (1, 4),
    },
}


def _sql_problem(rng: random.Random) -> Record:
    table = rng.choice(sorted(TABLES))
    spec = TABLES[table]
    cols = list(spec)
    name_col, cat_col, num1, num2 = cols
    ddl = f"CREATE TABLE {table} ({name_col} TEXT, {cat_col} TEXT, {num1} INTEGER, {num2} INTEGER)"
    rows = []
    for name in rng.sample(spec[name_col], rng.randint(5, 8)):
        rows.append(
            (name, rng.choice(spec[cat_col]), rng.randint(*spec[num1]), rng.randint(*spec[num2]))
        )
    inserts = "; ".join(
        f"INSERT INTO {table} VALUES ('{r[0]}', '{r[1]}', {r[2]}, {r[3]})" for r in rows
    )
    num = rng.choice([num1, num2])
    cat = rng.choice(spec[cat_col])
    threshold = rng.choice(rows)[cols.index(num)]
    kind = rng.randrange(5)
    if kind == 0:
        q = f"How many {table} have {num} greater than {threshold}?"
        sql = f"SELECT COUNT(*) FROM {table} WHERE {num} > {threshold}"
    elif kind == 1:
        q = f"What is the {name_col} of the {table[:-1]} with the highest {num}?"
        sql = f"SELECT {name_col} FROM {table} ORDER BY {num} DESC LIMIT 1"
    elif kind == 2:
        q = f"What is the average {num} of {table} whose {cat_col} is '{cat}'?"
        sql = f"SELECT AVG({num}) FROM {table} WHERE {cat_col} = '{cat}'"
    elif kind == 3:
        q = f"List the {name_col} of all {table} whose {cat_col} is '{cat}'."
        sql = f"SELECT {name_col} FROM {table} WHERE {cat_col} = '{cat}'"
    else:
        q = f"What is the total {num} of all {table}?"
        sql = f"SELECT SUM({num}) FROM {table}"
    return {"question": q, "context": ddl, "answer": sql, "setup": f"{ddl}; {inserts}"}


def _multistep_problem(rng: random.Random, steps: int) -> Record:
    """A running total changed by ``steps`` operations (add, take away, multiply, share out),
    every intermediate a whole number from 1 to 999; the answer shows each step."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(5, 60)
    sentences, work = [f"{name} has {total} {item}."], []
    for _ in range(steps):
        factors = [k for k in (2, 3, 4) if total * k <= 999]
        divisors = [k for k in (2, 3, 4, 5) if total % k == 0]
        ops = ["add"] + ["sub"] * (total >= 3) + ["mul"] * bool(factors) + ["div"] * bool(divisors)
        op = rng.choice(ops)
        if op == "add":
            b = rng.randint(2, 40)
            sentences.append(f"Then {name} {rng.choice(['gets', 'finds'])} {b} more.")
            work.append(f"{total} + {b} = {total + b}")
            total += b
        elif op == "sub":
            b = rng.randint(1, total - 1)
            sentences.append(f"Then {name} {rng.choice(['gives away', 'loses'])} {b}.")
            work.append(f"{total} - {b} = {total - b}")
            total -= b
        elif op == "mul":
            b = rng.choice(factors)
            sentences.append(f"Then {name} makes the number of {item} {b} times as large.")
            work.append(f"{total} * {b} = {total * b}")
            total *= b
        else:
            b = rng.choice(divisors)
            sentences.append(f"Then {name} splits them into {b} equal groups and keeps one.")
            work.append(f"{total} / {b} = {total // b}")
            total //= b
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return {"question": question, "answer": f"{', '.join(work)}.\n#### {total}"}


GENERATORS: dict[str, Callable[[random.Random, int], Record]] = {
    "arithmetic": lambda rng, difficulty: _arithmetic_problem(rng),
    "multistep": _multistep_problem,
    "sql": lambda rng, difficulty: _sql_problem(rng),
}


def generate(task: str, n: int, seed: int, difficulty: int = 4) -> list[Record]:
    """``n`` examples of ``task``, the same for the same seed on every rank and machine;
    ``difficulty`` is the number of operations of a ``multistep`` problem."""
    rng = random.Random(f"{task}:{seed}" if task != "multistep" else f"{task}:{difficulty}:{seed}")
    return [GENERATORS[task](rng, difficulty) for _ in range(n)]
