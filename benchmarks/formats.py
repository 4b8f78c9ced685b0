"""Every data format trains SmolLM2-135M-Instruct end to end, and so does a mix of them.

The generated arithmetic problems are written out as each format a user brings: OpenAI
``messages`` (two problems per conversation, a system turn first, both answers trained),
ShareGPT ``conversations``, alpaca (instruction, input, output), plain ``text``, and a
``data.datasets`` mix of conversations and text. Each is a real ``rosa-ds train`` run (LoRA r=8,
one process, the shipped smollm2-lora config otherwise) whose held-out loss must fall; the run
also says which format ``auto`` detected. Prints a table, and ends with the key figures.

    python benchmarks/formats.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYSTEM = "You are a careful calculator. Answer with the working and the number."


def as_format(fmt: str, rows: list[dict[str, str]]) -> list[dict]:
    """The generated problems (question, answer) in one format."""
    if fmt == "messages":
        return [{"messages": [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": a["question"]},
                              {"role": "assistant", "content": a["answer"]},
                              {"role": "user", "content": b["question"]},
                              {"role": "assistant", "content": b["answer"]}]}
                for a, b in zip(rows[::2], rows[1::2], strict=False)]  # fmt: skip
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": r["question"]},
                                   {"from": "gpt", "value": r["answer"]}]} for r in rows]  # fmt: skip
    if fmt == "alpaca":
        return [{"instruction": "Solve the problem.", "input": r["question"], "output": r["answer"]}
                for r in rows]  # fmt: skip
    if fmt == "text":
        return [{"text": f"{r['question']}\n{r['answer']}"} for r in rows]
    raise ValueError(fmt)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train(name: str, data_args: list[str], out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "rosa_ds.cli", "train", "--config", "smollm2-lora",
           f"output_dir={out}", f"train.max_steps={args.steps}", "train.global_batch_size=4",
           "train.micro_batch_size=4", "train.warmup_steps=2", "train.lr=1e-3",
           "data.max_length=192", "data.eval_split=null", "eval.num_generate=0",
           "eval.max_loss_examples=32", "train.save_every=0", "train.trackers=[]",
           "deepspeed.config=zero2", *data_args]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=path)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    detected = re.findall(r"data\.format auto: (\w+)|\((\w+), detected\)", proc.stderr)
    summary["detected"] = "+".join(a or b for a, b in detected) or "-"
    summary["wall"] = time.time() - start
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--examples", type=int, default=240, help="problems per format")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs" / "formats"))
    args = ap.parse_args()

    from rosa_ds.data.tasks import generate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate("arithmetic", args.examples, seed=7)
    files = {f: write_jsonl(out / f"{f}.jsonl", as_format(f, rows))
             for f in ("messages", "sharegpt", "alpaca", "text")}  # fmt: skip
    cases = {f: [f"data.dataset={p}"] for f, p in files.items()}
    cases["mix"] = [f"data.datasets=[{{path: {files['messages']}, weight: 2}}, "
                    f"{{path: {files['text']}, weight: 1}}]"]  # fmt: skip
    results = {}
    for name, data_args in cases.items():
        s = train(name, data_args, out / f"run-{name}", args)
        results[name] = {
            "detected": s["detected"],
            "eval_loss_before": s["before"]["eval_loss"],
            "eval_loss_after": s["after"]["eval_loss"],
            "loss_first": s["loss_first"],
            "loss_last": s["loss_last"],
            "seconds": round(s["wall"], 1),
        }
        r = results[name]
        print(f"{name:<9} detected {r['detected']:<22} held-out loss {r['eval_loss_before']:.3f}"
              f" -> {r['eval_loss_after']:.3f}  ({r['seconds']} s)", flush=True)  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    drops = {k: v["eval_loss_before"] - v["eval_loss_after"] for k, v in results.items()}
    print(" ".join(f"{k}_loss_drop={v:.3f}" for k, v in drops.items())
          + f" all_learn={int(all(d > 0 for d in drops.values()))}")  # fmt: skip


if __name__ == "__main__":
    main()
