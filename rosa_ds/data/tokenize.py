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
    """Best-fit packing of whole examples into sequences of at most ``max_length`` tokens.

    Examples go longest first into the sequence with the least room that still holds them (a
    new one when none does), so few tokens are left as padding. ``position_ids`` restart at each
    example; a batch of packed sequences goes to the model without an attention mask
    (``batching.model_inputs``), so transformers builds a block-diagonal causal mask from the
    restarts (flash attention reads them as sequence boundaries): no example attends to
    another. Each example's first label is dropped, as the causal shift drops it unpacked, so
    no token learns to predict the next example's first token.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        fits = [b for b, r in enumerate(room) if r >= n]
        if fits:
            best = min(fits, key=lambda b: room[b])
            bins[best].append(i)
            room[best] -= n
        else:
            bins.append([i])
            room.append(max_length - n)
    packed = []
    for members in bins:
        seq: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(members):  # within a sequence, the data's own order
            ex = examples[i]
            n = len(ex["input_ids"])
            seq["input_ids"] += ex["input_ids"]
            seq["labels"] += [IGNORE] + ex["labels"][1:]
            seq["position_ids"] += list(range(n))
        packed.append(seq)
    return packed
