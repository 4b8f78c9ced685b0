"""Rank discovery from each launcher's environment, and the env report."""

import pytest

from rosa_ds.dist import Placement, detect_placement


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, Placement(0, 1, 0, "single")),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Placement(3, 4, 1, "torch")),
        (
            {
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            },
            Placement(1, 2, 1, "mpi"),
        ),
        ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1"}, Placement(5, 8, 1, "mpi")),
        (
            {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0"},
            Placement(6, 8, 2, "slurm"),
        ),
        # An sbatch script itself (no srun step) is not a rank of a multi-task job.
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, Placement(0, 1, 0, "single")),
    ],
)
def test_detect_placement(env, expected):
    assert detect_placement(env) == expected


def test_env_report_names_accelerator_and_backend():
    from rosa_ds.env_report import environment_report, format_report

    report = environment_report()
    assert report["packages"]["torch"] and report["packages"]["deepspeed"]
    assert report["comm_backend"] in ("gloo", "nccl")
    text = format_report(report)
    assert "accelerator" in text and "comm backend" in text
