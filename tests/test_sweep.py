"""``rosa-ds sweep``: grid expansion and names, skip-on-plan, refusing a changed cell, the
report's table, plots and slopes, and a local sweep interrupted mid-cell and run again (the
SLURM job-array path runs on the local cluster in tests/test_slurm.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from rosa_ds.config import parse_override
from rosa_ds.errors import UserError
from rosa_ds.sweep.cells import resolve_cells, write_sweep
from rosa_ds.sweep.grid import parse_grid, render
from rosa_ds.sweep.report import exponents, loglog_slope, report
from tests.helpers import REPO, child_env, wait_for_logged_step

GRID = {
    "base": "tiny-lora",
    "fixed": {"train.max_steps": 2},
    "axes": {
        "model": {"tiny": {"model.name_or_path": "builtin:tiny-llama"}},
        "method": {
            "lora": {"adapter.rank": 4},
            "rosa": {"adapter.rank": 4, "adapter.density": 0.01},
        },
        "seed": [0, 1],
        "world_size": [1, 2],
    },
}


def test_grid_expands_every_combination_with_stable_names():
    cells = parse_grid(GRID).cells()
    assert len(cells) == 1 * 2 * 2 * 2
    first = cells[0]
    assert first.name == "model-tiny__method-lora__seed-0__world_size-1"
    # fixed first, then the axes in file order; world_size is the launch, not an override
    assert first.overrides == (
        "train.max_steps=2",
        "model.name_or_path=builtin:tiny-llama",
        "adapter.rank=4",
        "seed=0",
    )
    assert [c.world_size for c in cells[:2]] == [1, 2]
    assert cells[2].labels == {"model": "tiny", "method": "lora", "seed": "1",
                               "world_size": "1"}  # fmt: skip
    # a value added to an axis names new cells and renames none
    wider = json.loads(json.dumps(GRID))
    wider["axes"]["seed"].append(2)
    assert {c.name for c in cells} < {c.name for c in parse_grid(wider).cells()}


def test_exclude_drops_the_cells_matching_every_key_of_a_rule():
    grid = json.loads(json.dumps(GRID))
    grid["exclude"] = [{"method": "rosa", "world_size": 2}, {"seed": [1]}]
    names = [c.name for c in parse_grid(grid).cells()]
    assert names == [
        "model-tiny__method-lora__seed-0__world_size-1",
        "model-tiny__method-lora__seed-0__world_size-2",
        "model-tiny__method-rosa__seed-0__world_size-1",
    ]
    grid["exclude"] = [{"method": "dora"}]
    with pytest.raises(UserError, match="exclude names method=.*which no axis has"):
        parse_grid(grid)


def test_fixed_as_a_list_of_overrides_means_what_it_says_on_the_command_line():
    grid = parse_grid({"fixed": ["train.max_steps=20", "train.lr=1e-3", "world_size=2"],
                       "axes": {"seed": [0]}})  # fmt: skip
    (cell,) = grid.cells()
    assert cell.world_size == 2
    assert dict(parse_override(o) for o in cell.overrides)["train.max_steps"] == 20


def test_cell_names_are_safe_file_names_of_bounded_length():
    grid = parse_grid({"axes": {"../a b/c": {"x/y": {"seed": 1}}, "data.dataset": ["x" * 300]}})
    (cell,) = grid.cells()
    assert "/" not in cell.name and " " not in cell.name and not cell.name.startswith(".")
    assert len(cell.name) <= 160
    longer = parse_grid({"axes": {"data.dataset": ["x" * 300 + "y"]}}).cells()[0].name
    assert longer != parse_grid({"axes": {"data.dataset": ["x" * 301]}}).cells()[0].name


def test_slurm_resources_fill_whole_nodes_and_the_script_is_valid_bash(tmp_path):
    from rosa_ds.sweep.slurm import array_script, resources

    assert resources(2, 0) == ["--ntasks=2", "--nodes=1"]
    assert resources(4, 8) == ["--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4"]
    assert resources(16, 8) == ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"]
    with pytest.raises(UserError, match="world size 12 does not fill nodes of 8 GPUs"):
        resources(12, 8)
    out = tmp_path / "a dir with 'quotes' and $HOME"
    grid = parse_grid({"axes": {"seed": [0, 1]}})
    cells = resolve_cells(grid.cells(), "tiny-lora", [], out, {})
    script = tmp_path / "array.sbatch"
    script.write_text(array_script(out, 1, cells))
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "OUT='" in text and "seed-0 seed-1" in text and "flock -n 9" in text


def test_sweep_report_routes_past_launcher_arguments(tmp_path, capsys):
    from rosa_ds.cli import run

    _fake_finished_sweep(tmp_path)
    assert run(["--local_rank=0", "sweep", "report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "3 of 4 cell(s) finished" in text and "too-big" in text


def test_report_rows_of_cells_without_figures_show_dashes_not_zeros(tmp_path):
    from rosa_ds.sweep.report import format_report

    _fake_finished_sweep(tmp_path)
    summary = tmp_path / "runs" / "model-0" / "summary.json"
    summary.write_text(json.dumps({"steps": 4, "telemetry": None, "after": None}))
    (tmp_path / "runs" / "model-1" / "summary.json").unlink()
    result = report(tmp_path)
    line = next(x for x in format_report(result).splitlines() if x.startswith("model-0 "))
    assert line.split()[3:] == ["-", "-", "-"]  # step time, tokens/s, quality
    assert result["rows"][1]["status"] == "not finished"


def test_axes_sharing_a_last_key_are_named_by_the_whole_key():
    grid = {"axes": {"seed": [2], "train.seed": [4], "train.lr": [1e-3]}}
    (cell,) = parse_grid(grid).cells()
    assert cell.name == "seed-2__train.seed-4__lr-0.001"


@pytest.mark.parametrize(
    "value", ["builtin:tiny-llama", "1e-3", "true", 3, 2.5e-4, True, None, ["q_proj", "v_proj"]]
)
def test_rendered_overrides_parse_back_to_the_value(value):
    key, parsed = parse_override(render("a.b", value))
    assert (key, parsed) == ("a.b", value)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"axes": {}}, "needs an axes: mapping"),
        ({"axes": {"train.seed": []}}, "has no values"),
        ({"axes": {"m": {"a b": {"x": 1}, "a_b": {"x": 2}}}}, "give the same cell name"),
        ({"axes": {"world_size": [0]}}, "world_size must be an integer >= 1"),
        ({"axes": {"train.seed": [1]}, "runs": 3}, "unknown section runs"),
        ({"axes": {"m": {"a": [1]}}}, "must be a mapping of config keys"),
        ({"axes": {"train.seed": [1]}, "plan": {"gpus": 8}}, "plan takes"),
        ({"axes": {"seed": [1]}, "plan": {"tflops": "400"}}, "plan.tflops must be a number"),
        ({"axes": {"seed": [1]}, "plan": {"device": "GPU"}}, "plan.device must be gpu or cpu"),
        ({"axes": {"seed": [1, 2]}, "exclude": [{"seed": [1, 2]}]}, "leaves no cell"),
        (
            {"axes": {"m": {"a": {"world_size": 4}}, "world_size": [1, 2]}},
            "world_size is set by m, world_size",
        ),
    ],
)
def test_bad_grids_name_the_problem(grid, message):
    with pytest.raises(UserError, match=message):
        parse_grid(grid)


def test_a_bad_cell_is_exit_2_in_one_line_and_nothing_is_written(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": "tiny-lora", "axes": {"train.lr": [1e-3, -1]}}))
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "rosa_ds.cli", "sweep", "--grid", str(grid), "--out", str(out)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("rosa-ds: error: cell lr--1: ") and "train.lr" in line
    assert not out.exists()


def test_cells_that_cannot_fit_are_skipped_with_the_reason(tmp_path):
    """Llama-3 70B cannot hold its frozen bf16 weights (140 GB) on one 80 GiB GPU; ZeRO-3 over
    enough GPUs can, and the reason says how many; 8B LoRA fits one."""
    grid = parse_grid(
        {
            "axes": {
                "model": {
                    "8b": {"model.name_or_path": "llama3-8b"},
                    "70b": {"model.name_or_path": "llama3-70b"},
                },
                "deepspeed.config": ["zero3"],
            },
            "fixed": {"train.micro_batch_size": 1, "train.global_batch_size": 8},
        }
    )
    options = {"device": "gpu", "gpu_memory_gib": 80, "tflops": 400}
    small, big = resolve_cells(grid.cells(), "tiny-lora", [], tmp_path, options)
    assert small.skip is None and small.plan["peak_gib"] < 80
    assert small.plan["step_seconds"] > 0 and small.plan["gpu_hours"] > 0
    assert big.skip is not None and "GiB per GPU > 80 GiB; fits at" in big.skip
    fits_at = int(big.skip.rsplit("fits at ", 1)[1].split()[0])
    batch = [f"train.global_batch_size={fits_at}"]
    again = resolve_cells([replace(big.cell, world_size=fits_at)], "tiny-lora", batch, tmp_path,
                          options)  # fmt: skip
    assert again[0].skip is None
    assert not any(tmp_path.iterdir())  # planning writes nothing


def test_plan_only_prints_the_table_and_writes_nothing(tmp_path, capsys):
    from rosa_ds.cli import run

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID, sort_keys=False))
    out = tmp_path / "sweep"
    assert run(["sweep", "--grid", str(grid), "--out", str(out), "--plan-only"]) == 0
    text = capsys.readouterr().out
    assert "model-tiny__method-rosa__seed-1__world_size-2" in text
    assert "8 cell(s), 0 skipped by the plan" in text
    assert not out.exists()


def test_a_cell_whose_config_changed_is_refused(tmp_path):
    grid = parse_grid({"axes": {"seed": [0]}})
    first = resolve_cells(grid.cells(), "tiny-lora", [], tmp_path, {})
    write_sweep(tmp_path, first, {})
    first[0].output_dir.mkdir(parents=True)  # the cell ran
    changed = resolve_cells(grid.cells(), "tiny-lora", ["train.lr=1e-4"], tmp_path, {})
    with pytest.raises(UserError, match=r"already ran .* with other settings \(train.lr\)"):
        write_sweep(tmp_path, changed, {})
    write_sweep(tmp_path, first, {})  # the same settings again: fine
    # a newer rosa-ds writes a key the old config lacks: not a change
    config = first[0].config_file
    config.write_text(config.read_text().replace("  packing: false\n", ""))
    write_sweep(tmp_path, first, {})
    resized = [replace(first[0], cell=replace(first[0].cell, world_size=2))]
    with pytest.raises(UserError, match=r"other settings \(world_size\)"):
        write_sweep(tmp_path, resized, {})


def test_loglog_slope_recovers_a_power_law():
    points = [(x, 3.0 * x**1.5) for x in (1e6, 4e6, 1.6e7, 6.4e7)]
    assert loglog_slope(points) == pytest.approx(1.5)
    assert loglog_slope([(1e6, 2.0), (1e6, 3.0)]) is None
    rows = [
        {"status": "finished", "method": "lora", "world_size": 1, "model_params": x,
         "step_seconds": 0.01 * x**0.8, "mask_seconds": None, "resample_seconds": None}
        for x in (1e6, 1e7, 1e8)
    ]  # fmt: skip
    assert exponents(rows) == {"step_seconds": {"lora@1": pytest.approx(0.8)}}


def _fake_finished_sweep(folder: Path) -> None:
    """A sweep folder whose cells' runs wrote summaries (as rosa-ds train writes them)."""
    cells = []
    for i, size in enumerate((1e6, 4e6, 1.6e7)):
        out = folder / "runs" / f"model-{i}"
        out.mkdir(parents=True)
        summary = {
            "steps": 4,
            "trainable_elements": 1000 * (i + 1),
            "loss_last": 1.0 / (i + 1),
            "after": {"eval_loss": 1.5 / (i + 1), "eval_ppl": 4.0, "number_match": 0.1 * i},
            "telemetry": {
                "median_step_seconds": 1e-7 * size,
                "median_tokens_per_second": 1e9 / size,
                "peak_rss_above_start_bytes": 2**30 * (i + 1) * 1.1,
                "planned_peak_bytes": 2**30 * (i + 1),
                "measured_over_planned": 1.1,
            },
            "resample_seconds": [0.5 * (i + 1), 0.7 * (i + 1)],
        }
        (out / "summary.json").write_text(json.dumps(summary))
        cells.append({"name": f"model-{i}", "labels": {"model": str(i)}, "method": "subspace",
                      "model": f"m{i}", "world_size": 1, "output_dir": str(out),
                      "plan": {"model_params": size, "peak_gib": i + 1.0}})  # fmt: skip
    cells.append({"name": "too-big", "labels": {}, "method": "lora", "model": "x",
                  "world_size": 1, "output_dir": str(folder / "runs" / "too-big"),
                  "plan": {}, "skip": "planned peak 99 GiB per GPU > 80 GiB"})  # fmt: skip
    (folder / "sweep.json").write_text(json.dumps({"cells": cells}))


def test_report_writes_the_table_the_plots_and_the_slopes(tmp_path):
    _fake_finished_sweep(tmp_path)
    result = report(tmp_path)
    out = tmp_path / "report"
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[0].startswith("name,method,model,world_size,status")
    assert "skipped: planned peak 99 GiB" in rows[-1]
    assert result["finished"] == 3
    assert result["exponents"]["step_seconds"]["subspace@1"] == pytest.approx(1.0)
    assert result["exponents"]["resample_seconds"]["subspace@1"] > 0
    assert result["planner_peak_error"]["max_abs"] == pytest.approx(0.1)
    assert result["rows"][2]["metric_name"] == "number_match"
    names = {Path(p).name for p in result["plots"]}
    assert names >= {"quality_by_trainable.png", "step_time_by_size.png",
                     "memory_planned_vs_measured.png"}  # fmt: skip
    for p in result["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["cells"] == 4


RANK = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
    "time.sleep(120)\n"
)
# a launcher's process tree: a runner starts a launcher, which starts two ranks and exits with
# the first failing rank's code (as deepspeed's runner and launch.py do)
LAUNCH = (
    "import subprocess, sys\n"
    f"ranks = [subprocess.Popen([sys.executable, '-c', {RANK!r}]) for _ in range(2)]\n"
    "sys.exit(max(r.wait() for r in ranks))\n"
)
RUNNER = f"import subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-c', {LAUNCH!r}]))\n"


def test_a_stop_reaches_the_ranks_a_launcher_starts_not_the_launchers():
    """``_ranks`` finds the launcher's children, and a stop asked while they start still
    reaches them: the runner ends with the ranks' 75."""
    import psutil

    from rosa_ds.sweep.local import _ranks, _Stop

    proc = subprocess.Popen([sys.executable, "-c", RUNNER], start_new_session=True)
    try:
        stop = _Stop()
        stop.requested = 1  # asked before the ranks exist: wait() keeps asking as they appear
        assert stop.wait(proc, world=2) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
    single = subprocess.Popen([sys.executable, "-c", RANK])
    try:
        (rank,) = _ranks(single, world=1)
        assert rank.pid == single.pid and isinstance(rank, psutil.Process)
    finally:
        single.kill()


@pytest.mark.slow
def test_an_interrupted_local_sweep_continues_where_it_stopped(tmp_path):
    """Ctrl-C while the second cell trains: it checkpoints and the sweep exits with 75; the
    same command skips the finished cell, resumes the stopped one from its checkpoint and
    finishes it. (How a stop reaches the ranks of a launcher: the test before this one.)"""
    lengths = {
        "short": {"train.max_steps": 2},
        "long": {"train.max_steps": 40, "train.save_every": 1000},
    }
    fixed = {"eval.num_generate": 0, "train.log_every": 1, "data.num_train": 64}
    grid = tmp_path / "grid.yaml"
    spec = {"base": "tiny-lora", "fixed": fixed, "axes": {"length": lengths}}
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "rosa_ds.cli", "sweep", "--grid", str(grid), "--out", str(out)]
    env = child_env(DS_ACCELERATOR="cpu")
    sweep = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    short, long = out / "runs" / "length-short", out / "runs" / "length-long"
    wait_for_logged_step(long, 3, [sweep], timeout=240)
    sweep.send_signal(signal.SIGINT)
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 75, stdout + stderr[-3000:]
    assert "length-long: stopped with a checkpoint" in stdout
    assert (short / "summary.json").is_file() and not (long / "summary.json").exists()
    stopped_at = max(int(p.name.split("-")[1]) for p in (long / "checkpoints").glob("step-*"))
    assert 3 <= stopped_at < 40
    short_mtime = (short / "summary.json").stat().st_mtime

    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert "length-short: finished before, skipped" in again.stdout
    assert (short / "summary.json").stat().st_mtime == short_mtime
    log = (out / "logs" / "length-long.log").read_text()
    assert "train.auto_resume: continuing from" in log
    summary = json.loads((long / "summary.json").read_text())
    assert summary["resumed_from"] == stopped_at
    result = report(out)
    assert result["finished"] == 2
