"""Bad input through the real command line: one line naming the problem, exit code 2, no
traceback, and nothing written or overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rosa_ds import cli
from tests.helpers import child_env, launch


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# Files a user can mistake for a run config: (file name, bytes, expected words).
CONFIG_FILES = {
    "config_empty": ("c.yaml", b"", "is empty"),
    "config_only_comments": ("c.yaml", b"# train:\n#   max_steps: 3\n", "is empty"),
    "config_binary": ("model.safetensors", b"\x08\0\0\0\0\0\0\0{}\0\0\xff\xfe", "not UTF-8 text"),
    "config_nul_bytes": ("c.yaml", b"train:\x00\x00\n", "binary file"),
    "config_latin1": ("c.yaml", "name: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    "config_list": ("c.yaml", b"- train\n- adapter\n", "must be a mapping"),
    "config_scalar": ("c.yaml", b"tiny-lora\n", "must be a mapping"),
}


def _case(name: str, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    """(arguments, extra environment, expected words in the message) for each case."""
    out = f"output_dir={tmp / 'out'}"
    base = ["train", "--config", "tiny-lora", out]
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    if name == "unknown_key":
        return [*base, "adapter.rnak=4"], {}, "unknown config key adapter.rnak"
    if name == "wrong_type":
        return [*base, "train.max_steps=ten"], {}, "train.max_steps must be an integer"
    if name == "rank_zero":
        return [*base, "adapter.rank=0"], {}, "adapter.rank must be > 0"
    if name == "stop_signal_unknown":
        return [*base, "train.stop_signals=[SIGKILL]"], {}, "are not stop signals"
    if name == "tracker_unknown":
        return [*base, "train.trackers=[neptune]"], {}, "train.trackers: ['neptune'] unknown"
    if name == "stop_timeout_negative":
        return [*base, "train.stop_timeout=-1"], {}, "train.stop_timeout must be >= 0"
    if name == "negative_lr":
        return [*base, "train.lr=-1"], {}, "train.lr must be > 0"
    if name == "target_matches_nothing":
        return [*base, "adapter.targets=[nothing_proj]"], {}, "matched no linear module"
    if name == "model_missing":
        return [*base, f"model.name_or_path={tmp / 'no-model'}"], {}, "does not exist"
    if name == "dataset_missing":
        return [*base, f"data.dataset={tmp / 'none.jsonl'}"], {}, "does not exist"
    if name == "dataset_field_missing":
        path = _jsonl(tmp / "d.jsonl", [{"prompt": r["prompt"]} for r in rows])
        return (
            [*base, f"data.dataset={path}", "data.format=prompt_response"],
            {},
            "lacks field 'response'",
        )
    if name == "dataset_empty_field":
        path = _jsonl(tmp / "d.jsonl", [*rows, {"prompt": "x", "response": " "}])
        return [*base, f"data.dataset={path}"], {}, "empty field 'response'"
    if name == "dataset_empty":
        (tmp / "empty.jsonl").write_text("")
        return [*base, f"data.dataset={tmp / 'empty.jsonl'}"], {}, "empty.jsonl"
    if name == "batch_not_divisible":
        return (
            [*base],
            {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"},
            "not divisible by train.micro_batch_size x ranks",
        )
    if name == "output_not_writable":
        (tmp / "file").write_text("x")
        return (
            ["train", "--config", "tiny-lora", f"output_dir={tmp / 'file' / 'sub'}"],
            {},
            "cannot be created",
        )
    if name == "resume_without_checkpoint":
        return [*base, "--resume"], {}, "no complete checkpoint"
    if name == "broken_yaml":
        (tmp / "bad.yaml").write_text("train: {max_steps: 3\n")
        return ["train", "--config", str(tmp / "bad.yaml"), out], {}, "not valid YAML"
    if name == "unknown_named_config":
        return ["train", "--config", "tiny-lorra", out], {}, "unknown config"
    if name == "unknown_ds_config":
        return [*base, "deepspeed.config=zero9"], {}, "unknown DeepSpeed config"
    if name == "flash_attention_without_it":  # no flash-attn package or no CUDA GPU here
        return [*base, "model.attn_implementation=flash_attention_2"], {}, "flash"
    if name == "chat_template_unknown":
        return [*base, "data.chat_template=vicuna"], {}, "data.chat_template must be true, false"
    if name == "too_few_examples":
        path = _jsonl(tmp / "d.jsonl", rows[:6])
        return [*base, f"data.dataset={path}"], {}, "fewer than one global batch"
    if name == "eval_truncated_adapter":
        folder = tmp / "adapter"
        folder.mkdir()
        (folder / "adapter.json").write_text("{}")
        (folder / "adapter.safetensors").write_bytes(b"\x10\x00\x00")
        return (
            ["eval", "--config", "tiny-lora", out, "--adapter", str(folder)],
            {},
            "cannot be read",
        )
    if name == "density_out_of_range":
        return [*base, "adapter.density=1.5"], {}, "adapter.density must be in [0, 1)"
    if name == "mask_warmup_longer_than_run":
        cont = "adapter.robust.after_mask=continue"
        return (
            ["train", "--config", "tiny-robust", out, "adapter.robust.mask_warmup_steps=50", cont],
            {},
            "longer than the run",
        )
    if name in CONFIG_FILES:
        file_name, content, words = CONFIG_FILES[name]
        (tmp / file_name).write_bytes(content)
        return ["train", "--config", str(tmp / file_name), out], {}, words
    if name == "config_folder":
        (tmp / "configs").mkdir()
        return ["train", "--config", str(tmp / "configs"), out], {}, "is a folder"
    if name == "config_device":
        return ["train", "--config", "/dev/null", out], {}, "not a regular file"
    if name == "config_deepspeed_json":
        ds_json = str(Path(__file__).parents[1] / "ds_configs" / "zero2.json")
        return ["train", "--config", ds_json, out], {}, "is a DeepSpeed config"
    if name == "config_empty_name":
        return ["train", "--config", "", out], {}, "--config is empty"
    if name == "config_missing_yaml":
        return ["train", "--config", str(tmp / "nope.yaml"), out], {}, "not found"
    if name == "mask_file_mismatch":
        from rosa_ds.adapters.masks import save_masks
        from rosa_ds.kernels.csr import SparseStructure

        bogus = {
            "model.layers.0.self_attn.q_proj": SparseStructure.from_flat_indices(
                torch.tensor([0, 5]), (32, 64)
            )
        }
        save_masks(tmp / "masks.safetensors", bogus)
        return (
            [
                "train",
                "--config",
                "tiny-robust",
                out,
                f"adapter.robust.mask_file={tmp / 'masks.safetensors'}",
            ],
            {},
            "mask file does not match the model",
        )
    if name == "mask_file_garbage":
        (tmp / "masks.safetensors").write_bytes(b"garbage!")
        return (
            [
                "train",
                "--config",
                "tiny-robust",
                out,
                f"adapter.robust.mask_file={tmp / 'masks.safetensors'}",
            ],
            {},
            "cannot be read",
        )
    if name == "resample_every_zero":
        return [*base, "adapter.resample_every=0"], {}, "adapter.resample_every must be > 0"
    if name == "resample_rank_too_high":
        return (
            ["train", "--config", "tiny-subspace", out, "adapter.rank=40"],
            {},
            "is above min(out, in)",
        )
    if name == "unknown_sampling":
        return (
            ["train", "--config", "tiny-subspace", out, "adapter.subspace.sampling=lucky"],
            {},
            "adapter.subspace.sampling must be one of",
        )
    if name == "model_weights_truncated":
        import shutil

        from rosa_ds.config import ModelConfig
        from rosa_ds.model import resolve_model_path

        model = tmp / "model"
        shutil.copytree(resolve_model_path(ModelConfig()), model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        return [*base, f"model.name_or_path={model}"], {}, "cannot be read"
    if name.startswith("resume_"):  # a hand-made checkpoint of this run, broken in one way
        ckpt = tmp / "out" / "checkpoints" / "step-000002"
        (ckpt / "adapter").mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text('{"step": 2, "phase": "train", "history": {}}')
        if name == "resume_other_targets":
            (ckpt / "adapter" / "adapter.json").write_text('{"modules": ["x"], "rank": 8}')
            return [*base, "--resume"], {}, "adapts other modules than adapter.targets"
        if name == "resume_other_rank":
            from rosa_ds.config import load_config
            from rosa_ds.model import check_model
            from rosa_ds.preflight import check_adapters

            cfg = load_config("tiny-lora")
            names = check_adapters(cfg, check_model(cfg.model)[1])
            meta = {"modules": names, "rank": cfg.adapter.rank + 4}
            (ckpt / "adapter" / "adapter.json").write_text(json.dumps(meta))
            return [*base, "--resume"], {}, "was written with adapter rank"
        if name == "resume_truncated_frozen":
            (ckpt / "frozen-00000-of-00001.safetensors").write_bytes(
                b"\x08\x00\x00\x00\x00\x00\x00\x00{}"
            )
            sub = ["train", "--config", "tiny-subspace", out, "--resume"]
            return sub, {}, "frozen-weight file"
        if name == "resume_incomplete_dir":
            broken = tmp / "out" / "checkpoints" / "step-000004.tmp"
            broken.mkdir()
            return [*base, f"--resume={broken}"], {}, "no complete checkpoint"
    if name == "density_pattern_not_regex":
        (tmp / "c.yaml").write_text(
            "adapter: {density: 0.01, robust: {density_patterns: {'q_proj[': 0.1}}}\n"
        )
        return ["train", "--config", str(tmp / "c.yaml"), out], {}, "not a valid regular"
    if name == "heartbeat_negative":
        return [*base, "deepspeed.heartbeat_timeout=-1"], {}, "heartbeat_timeout must be >= 0"
    if name in ("export_base_missing", "eval_foreign_subspace_adapter"):
        from safetensors.torch import save_file

        folder = tmp / "adapter"
        folder.mkdir()
        save_file({"x.lora_A": torch.zeros(2, 2)}, str(folder / "adapter.safetensors"))
        meta = {
            "method": "subspace",
            "base_model": "builtin:tiny-llama",
            "modules": ["x"],
            "delta_ranks": {"x": 2},
        }
        (folder / "adapter.json").write_text(json.dumps(meta))
        if name == "export_base_missing":
            cmd = ["export", "--adapter", str(folder), "--base", str(tmp / "nope")]
            return cmd, {}, "does not exist"
        cmd = ["eval", "--config", "tiny-lora", out, "--adapter", str(folder)]
        return cmd, {}, "does not fit the base model"
    if name == "bad_subcommand_flag":
        return ["train", "--config", "tiny-lora", "--frobnicate"], {}, "unrecognized arguments"
    raise ValueError(name)


CASES = [
    "unknown_key",
    "wrong_type",
    "rank_zero",
    "negative_lr",
    "stop_signal_unknown",
    "stop_timeout_negative",
    "tracker_unknown",
    "target_matches_nothing",
    "model_missing",
    "dataset_missing",
    "dataset_field_missing",
    "dataset_empty_field",
    "dataset_empty",
    "batch_not_divisible",
    "output_not_writable",
    "resume_without_checkpoint",
    "broken_yaml",
    "unknown_named_config",
    "unknown_ds_config",
    "too_few_examples",
    "eval_truncated_adapter",
    "bad_subcommand_flag",
    "density_out_of_range",
    "mask_warmup_longer_than_run",
    *CONFIG_FILES,
    "config_folder",
    "config_device",
    "config_deepspeed_json",
    "config_empty_name",
    "config_missing_yaml",
    "mask_file_mismatch",
    "mask_file_garbage",
    "resample_every_zero",
    "resample_rank_too_high",
    "unknown_sampling",
    "model_weights_truncated",
    "resume_other_targets",
    "resume_other_rank",
    "resume_truncated_frozen",
    "resume_incomplete_dir",
    "density_pattern_not_regex",
    "heartbeat_negative",
    "export_base_missing",
    "eval_foreign_subspace_adapter",
    "flash_attention_without_it",
    "chat_template_unknown",
]


# Through a real `python -m rosa_ds.cli` process: one case of each stage that can fail (config,
# command line, launcher environment, pre-flight of model, data and checkpoints, eval, export).
# The others call the same entry point, `rosa_ds.cli.main(argv)`, in this process: the same code
# path without 3-5 s of imports per case, their output captured at the file descriptors.
IN_SUBPROCESS = {
    "unknown_key",
    "config_binary",
    "bad_subcommand_flag",
    "batch_not_divisible",
    "dataset_field_missing",
    "model_weights_truncated",
    "resume_other_rank",
    "mask_file_mismatch",
    "eval_truncated_adapter",
    "export_base_missing",
}


def _run_in_process(args, extra_env, monkeypatch, capfd) -> tuple[int, str, str]:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that undo removes what the test sets
        monkeypatch.delenv(key)
    for key, value in extra_env.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    out, err = capfd.readouterr()
    return exited.value.code, out, err


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(name, tmp_path, monkeypatch, capfd):
    args, extra_env, words = _case(name, tmp_path)
    before = _snapshot(tmp_path)
    if name in IN_SUBPROCESS:
        proc = launch(args, env=child_env(**extra_env))
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = _run_in_process(args, extra_env, monkeypatch, capfd)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert code == 2, out + err
    assert len(lines) == 1, lines
    assert lines[0].startswith("rosa-ds: error:") and words in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    before = _snapshot(tmp_path)
    proc = launch(["train", "--config", "tiny-lora", f"output_dir={out}"])
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert _snapshot(tmp_path) == before
