"""Prompt formatting and tokenization: which tokens carry the loss.

- A conversation (``messages``), or a single prompt/response turn when the tokenizer has a chat
  template, is rendered by the template; every assistant turn is trained, with the template's
  own end-of-turn tokens (not an appended EOS), and nothing else unless
  ``data.train_on_inputs``. Templates with generation markers (``{% generation %}``) give the
  assistant tokens through ``apply_chat_template(return_assistant_tokens_mask=True)``; for the
  others (most shipped templates) each assistant turn is found as the text between the
  conversation rendered up to its generation prompt and rendered through it, mapped to tokens
  by the fast tokenizer's offsets.
- Without a template a single turn is ``### Question / ### Answer``, the response, then EOS.
- Plain ``text`` trains every token.

Labels of untrained tokens are -100.
"""

from __future__ import annotations

import re
from typing import Any

from rosa_ds.config import CHAT_TEMPLATE_NAMES
from rosa_ds.errors import UserError

IGNORE = -100
PLAIN_TEMPLATE = "### Question:\n{prompt}\n### Answer:\n"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAMED_TEMPLATES = dict(zip(CHAT_TEMPLATE_NAMES, [CHATML], strict=True))
GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def apply_template_choice(tokenizer: Any, choice: bool | str) -> None:
    """``data.chat_template`` as a name or a Jinja string becomes the tokenizer's template."""
    if isinstance(choice, str):
        tokenizer.chat_template = NAMED_TEMPLATES.get(choice, choice)


def uses_template(tokenizer: Any, use_chat_template: bool | str) -> bool:
    return bool(use_chat_template) and bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer: Any, prompt: str, use_chat_template: bool | str) -> str:
    if uses_template(tokenizer, use_chat_template):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def prompt_ids(tokenizer: Any, prompt: str, use_chat_template: bool | str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, prompt, use_chat_template), add_special_tokens=False)[
        "input_ids"
    ]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[range]]:
    """The conversation as its template renders it, and the characters of each assistant turn
    (its content and the template's end-of-turn text)."""
    full = _render(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError(
                "the tokenizer's chat template does not render a conversation's first turns "
                "as the start of the whole conversation, so the assistant tokens cannot be "
                "found; set data.chat_template (for example chatml) or data.chat_template=false"
            )
        spans.append(range(len(before), len(through)))
    return full, spans


def conversation_tokens(
    tokenizer: Any, messages: list[dict[str, str]], train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    """``input_ids`` and ``labels`` of a conversation rendered by the chat template."""
    if GENERATION_MARK.search(tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    else:
        full, spans = assistant_spans(tokenizer, messages)
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(
                "finding the assistant tokens of a chat template without generation markers "
                "needs a fast tokenizer (offsets); use one, or a template with "
                "{% generation %} markers in data.chat_template"
            )
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(start in s for s in spans)) for start, _ in enc["offset_mapping"]]
    labels = (
        ids if train_on_inputs else [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    )
    return ids, list(labels)


def record_tokens(
    rec: dict[str, Any], tokenizer: Any, use_chat_template: bool | str, train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    """``input_ids`` and ``labels`` of one record, before truncation."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in rec:
        ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"] + eos
        return ids, list(ids)
    if "messages" in rec or uses_template(tokenizer, use_chat_template):
        if not uses_template(tokenizer, True):
            raise UserError(
                "conversations (data.format messages) need a chat template; the tokenizer has "
                "none: set data.chat_template (for example chatml)"
            )
        messages = rec.get("messages") or [
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": rec["response"]},
        ]
        return conversation_tokens(tokenizer, messages, train_on_inputs)
    p = prompt_ids(tokenizer, rec["prompt"], use_chat_template)
    r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + eos
    return p + r, (list(p) if train_on_inputs else [IGNORE] * len(p)) + r


def tokenize_records(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    use_chat_template: bool | str,
    train_on_inputs: bool = False,
) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` per record; records whose trained tokens are cut off
    entirely by ``max_length`` are dropped (they would carry no loss)."""
    out = []
    for rec in records:
        ids, labels = record_tokens(rec, tokenizer, use_chat_template, train_on_inputs)
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE for label in labels[1:]):
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
