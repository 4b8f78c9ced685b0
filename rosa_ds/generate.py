"""``rosa-ds generate``: text from a trained run (any method, ROSA's accumulated update included)
or a base model, in one process without DeepSpeed: the adapter merged into the weights in
memory, prompts from the command line, a file, or an interactive chat that keeps the
conversation and renders it with the chat template.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch

from rosa_ds.adapted_model import DTYPES, load_adapted_model, merge_adapters
from rosa_ds.config import ModelConfig, load_config
from rosa_ds.data.tokenize import apply_template_choice, prompt_text, uses_template
from rosa_ds.errors import UserError
from rosa_ds.model import check_model, load_tokenizer


def _check_args(args: argparse.Namespace) -> None:
    if not (args.run or args.adapter or args.base):
        raise UserError("generate needs --run DIR, --adapter DIR or --base MODEL")
    if args.run and args.adapter:
        raise UserError("give --run or --adapter, not both")
    if not (args.prompt or args.file or args.chat):
        raise UserError("generate needs --prompt TEXT, --file FILE or --chat")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")


def load_for_generation(args: argparse.Namespace) -> tuple[Any, Any, bool | str]:
    """The model with its adapter merged, its tokenizer, and the chat-template setting the run
    trained with (``data.chat_template`` of its config.yaml; the flag can turn it off)."""
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    adapter = (
        Path(args.adapter) if args.adapter else Path(args.run) / "adapter" if args.run else None
    )
    template: bool | str = True
    if args.run:
        if (
            not (Path(args.run) / "config.yaml").is_file()
            or adapter is None
            or not adapter.is_dir()
        ):
            raise UserError(
                f"{args.run} is not a finished run (no config.yaml and adapter/); give a run's "
                "output_dir or --adapter"
            )
        template = load_config(str(Path(args.run) / "config.yaml")).data.chat_template
    if adapter is not None:
        model, tokenizer, _ = load_adapted_model(adapter, args.base, dtype)
        merge_adapters(model)
    else:
        from transformers import AutoModelForCausalLM

        cfg = ModelConfig(name_or_path=args.base)
        path, _ = check_model(cfg)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", **cfg.pretrained_kwargs()
        )
        tokenizer = load_tokenizer(path, cfg)
    apply_template_choice(tokenizer, template)
    model.config.use_cache = True
    model.eval()
    return model, tokenizer, False if args.no_chat_template else template


def _file_prompts(path: str) -> Iterator[str | list[dict[str, str]]]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read prompts from {path} ({exc.strerror})") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {i + 1} is not JSON ({exc.msg})") from None
            if "messages" in row:
                yield row["messages"]
            elif "prompt" in row:
                yield row["prompt"]
            else:
                raise UserError(f"{path} line {i + 1} has no prompt or messages field")
        else:
            yield line


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str | list[dict[str, str]],
    template: bool | str,
    args: argparse.Namespace,
) -> str:
    """The model's continuation of one prompt (a string, or a conversation to continue)."""
    if isinstance(prompt, list):
        if not uses_template(tokenizer, template):
            raise UserError("a conversation needs a chat template; the tokenizer has none")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    elif args.system and uses_template(tokenizer, template):
        turns = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt_text(tokenizer, prompt, template)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    sample = args.temperature > 0
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=args.max_new_tokens,
            do_sample=sample,
            temperature=args.temperature if sample else None,
            top_p=args.top_p if sample else None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def chat(model: Any, tokenizer: Any, template: bool | str, args: argparse.Namespace,
         stdin: TextIO) -> None:  # fmt: skip
    """Read a user turn per line until an empty line or end of input; answer each with the
    whole conversation so far."""
    turns = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stdin.readline()
        if not line or not line.strip():
            return
        turns.append({"role": "user", "content": line.rstrip("\n")})
        answer = generate_text(model, tokenizer, list(turns), template, args)
        turns.append({"role": "assistant", "content": answer})
        print(f"model> {answer}" if interactive else answer, flush=True)


def run_generate(args: argparse.Namespace) -> int:
    _check_args(args)
    torch.manual_seed(args.seed)
    model, tokenizer, template = load_for_generation(args)
    prompts: list[str | list[dict[str, str]]] = list(args.prompt)
    if args.file:
        prompts += list(_file_prompts(args.file))
    for prompt in prompts:
        answer = generate_text(model, tokenizer, prompt, template, args)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": answer}), flush=True)
        else:
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            print(f"### {shown}\n{answer}\n", flush=True)
    if args.chat:
        chat(model, tokenizer, template, args, sys.stdin)
    return 0
