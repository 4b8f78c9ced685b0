"""``rosa-ds train | prepare | eval | export | generate | env | plan | sweep``: the command line.

Bad input (config, command line, data, checkpoints) is one line on stderr and exit code 2. A
run that cannot go on (a lost rank, non-finite numbers) is one line and exit code 1, naming the
cause and how to continue. Anything else exits non-zero with the traceback: a bug or a broken
machine, not a user mistake.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rosa_ds.errors import TrainingError, UserError
from rosa_ds.preemption import Preempted


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage; we want one line
        raise UserError(f"{message}; see {self.prog} --help")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="named config (e.g. tiny-lora) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="a run's output_dir (its adapter and its chat template)")
    p.add_argument("--adapter", help="an adapter folder instead of --run")
    p.add_argument("--base", help="the base model (default: the adapter's); alone: no adapter")
    p.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", "-f", help="prompts, one per line, or JSONL with prompt or messages")
    p.add_argument("--chat", action="store_true", help="an interactive chat on stdin")
    p.add_argument("--system", help="a system turn first (chat template models)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--no-chat-template", action="store_true", help="the plain ### template")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="for sampling (--temperature > 0)")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rosa-ds",
        description="Distributed LoRA / RoSA / ROSA fine-tuning of causal LMs on DeepSpeed ZeRO.",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="fine-tune (one process, or one rank under any launcher)")
    _add_config_args(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue from the latest checkpoint of output_dir (or of DIR)",
    )
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p = sub.add_parser(
        "prepare",
        help="tokenize (and pack) a config's data into the cache ahead of a job",
        description="Load, tokenize and pack the data of a run config into the tokenized-data "
        "cache (data.cache_dir), where every rank of the run, its resumes and later runs with "
        "the same data, tokenizer and settings find it.",
    )
    _add_config_args(p)
    p = sub.add_parser("eval", help="held-out loss, perplexity and task metric")
    _add_config_args(p)
    p.add_argument("--adapter", help="adapter folder (default: <output_dir>/adapter if present)")
    p = sub.add_parser("export", help="merged Hugging Face model plus adapter files")
    p.add_argument("--run", help="a run's output_dir (uses <run>/adapter)")
    p.add_argument("--adapter", help="an adapter folder instead of --run")
    p.add_argument("--out", help="where to write (default: <run>/export)")
    p.add_argument("--base", help="base model, if not the one recorded in the adapter")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], default="auto")
    p = sub.add_parser(
        "generate",
        help="text from a run (any method), an adapter or a base model: prompts or a chat",
    )
    _add_generate_args(p)
    p = sub.add_parser("env", help="installed packages, accelerator, backend and kernels")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("plan", help="memory and communication per GPU, before any run")
    from rosa_ds.plan import add_arguments as add_plan_arguments  # pure Python, no torch

    add_plan_arguments(p)
    p = sub.add_parser(
        "sweep",
        help="a grid of runs, planned, then run here or as SLURM job arrays",
        description="Expand a grid of config overrides into runs, plan each, and run them "
        "one after another (or --slurm: as job arrays). Tables and plots of the results: "
        "rosa-ds sweep report DIR.",
    )
    from rosa_ds.sweep import add_arguments as add_sweep_arguments

    add_sweep_arguments(p)
    return parser


def build_report_parser() -> argparse.ArgumentParser:
    from rosa_ds.sweep import add_report_arguments

    p = _Parser(
        prog="rosa-ds sweep report",
        description="Collect a sweep's results into results.csv / results.json and PNG plots.",
    )
    add_report_arguments(p)
    return p


def _is_main_rank() -> bool:
    from rosa_ds.dist import detect_placement

    return detect_placement().rank == 0


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    words = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if words[:2] == ["sweep", "report"]:  # a command of its own: a folder, not a grid
        from rosa_ds.sweep import run_report

        return run_report(build_report_parser().parse_args(words[2:]))
    args = build_parser().parse_args(argv)
    if args.command in ("train", "eval"):
        from rosa_ds.config import config_help, dump_config, load_config

        if getattr(args, "help_config", False):
            print(config_help())
            return 0
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "print_config", False):
            print(dump_config(cfg), end="")
            return 0
        if args.command == "train":
            from rosa_ds.plan import planned_peak_bytes
            from rosa_ds.train import train

            summary = train(cfg, resume=args.resume, plan_peak=planned_peak_bytes)
            if _is_main_rank():
                print_summary(summary)
        else:
            from rosa_ds.evaluate import evaluate

            results = evaluate(cfg, args.adapter)
            if _is_main_rank():
                print(json.dumps(results, indent=2))
        return 0
    if args.command == "prepare":
        from rosa_ds.config import load_config
        from rosa_ds.data.prepare import run_prepare

        return run_prepare(load_config(args.config, args.overrides))
    if args.command == "export":
        from rosa_ds.export import export

        if not args.run and not args.adapter:
            raise UserError("export needs --run DIR or --adapter DIR")
        adapter = Path(args.adapter) if args.adapter else Path(args.run) / "adapter"
        out = args.out or str(Path(args.run or adapter.parent) / "export")
        written = export(adapter, out, base=args.base, dtype=args.dtype)
        for kind, path in written.items():
            print(f"{kind}: {path}")
        return 0
    if args.command == "generate":
        from rosa_ds.generate import run_generate

        return run_generate(args)
    if args.command == "env":
        from rosa_ds.env_report import environment_report, format_report

        report = environment_report()
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0
    if args.command == "plan":
        from rosa_ds.plan import run_plan

        return run_plan(args)
    if args.command == "sweep":
        from rosa_ds.sweep import run_sweep

        return run_sweep(args)
    raise AssertionError(args.command)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_summary(s: dict) -> None:
    before, after = s.get("before") or {}, s.get("after") or {}
    print(
        f"\ntrained {s['steps']} steps (from step {s['resumed_from']}) on {s['world_size']} "
        f"rank(s), ZeRO-{s['zero_stage']}, in {s['train_seconds']} s"
    )
    if s["losses"]:
        print(f"train loss      {s['loss_first']:.4f} -> {s['loss_last']:.4f}")
    for key in after:
        if key in before:
            print(f"{key:<15} {before[key]:.4f} -> {after[key]:.4f}")
        else:
            print(f"{key:<15} {after[key]:.4f}")
    tel = s.get("telemetry") or {}
    if "median_tokens_per_second" in tel:
        mfu = f"MFU {tel['median_mfu']:.1%}" if "median_mfu" in tel else "MFU n/a (no peak known)"
        print(
            f"throughput      {tel['median_tokens_per_second']:.0f} tokens/s "
            f"({tel['median_label_tokens_per_second']:.0f} label tokens/s), "
            f"{tel['median_step_seconds']:.3f} s/step, {mfu}"
        )
    peak = tel.get("peak_allocated_bytes") or tel.get("peak_rss_above_start_bytes")
    if peak:
        planned = tel.get("planned_peak_bytes")
        plan_text = f" (planned {_size(planned)})" if planned else ""
        kind = "CUDA allocated" if "peak_allocated_bytes" in tel else "RSS growth"
        print(f"peak memory     {_size(peak)} {kind} per rank{plan_text}")
    print(f"checkpoint      {s['checkpoint']}")
    print(f"adapter         {s['adapter']}")
    if s.get("mask_nnz") is not None:
        acc = s.get("accumulator_bytes") or {}
        print(
            f"sparse masks    {s['mask_nnz']} non-zeros; gradient accumulator on this rank "
            f"{acc.get('local', 0) / 2**20:.2f} MiB of {acc.get('dense', 0) / 2**20:.2f} MiB dense"
        )
    print(f"merged and PEFT rosa-ds export --run {Path(s['adapter']).parent}")


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except UserError as exc:
        if _is_main_rank() or os.environ.get("ROSA_DS_ALL_RANKS_REPORT"):
            print(f"rosa-ds: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except Preempted as exc:
        if _is_main_rank():
            print(f"rosa-ds: {exc}", file=sys.stderr)
        code = exc.exit_code
    except TrainingError as exc:  # every rank says it: the main rank may be the one lost
        print(f"rosa-ds: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `rosa-ds plan | head`: the reader left, which is no error
        code = 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second traceback
        code = code or 0
    sys.exit(code)


if __name__ == "__main__":
    main()
