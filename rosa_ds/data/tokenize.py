"""Prompt formatting and tokenization: the loss falls on response tokens only.

The prompt goes through the tokenizer's chat template when it has one (a user turn plus the
generation prompt), else a plain ``### Question / ### Answer`` template; the response follows,
then EOS. Prompt tokens get label -100.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100
PLAIN_TEMPLATE = "### Question:\n{prompt}\n### Answer:\n"


def prompt_text(tokenizer: Any, prompt: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def prompt_ids(tokenizer: Any, prompt: str, use_chat_template: bool) -> list[int]:
    return tokenizer(prompt_text(tokenizer, prompt, use_chat_template), add_special_tokens=False)[
        "input_ids"
    ]


def tokenize_records(
    records: list[dict[str, str]], tokenizer: Any, max_length: int, use_chat_template: bool
) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` per record; records whose response is cut off entirely by
    ``max_length`` are dropped (they would carry no loss)."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for rec in records:
        p = prompt_ids(tokenizer, rec["prompt"], use_chat_template)
        r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + eos
        ids = (p + r)[:max_length]
        labels = ([IGNORE] * len(p) + r)[:max_length]
        if any(label != IGNORE for label in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy packing of whole examples into sequences of at most ``max_length`` tokens.

    ``position_ids`` restart at each example. Attention is not blocked between the examples of
    one sequence (as in most trainers' packing), which is the price of fewer pad tokens.
    """
    packed: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            packed.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        packed.append(cur)
    return packed
