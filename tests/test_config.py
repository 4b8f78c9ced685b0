"""Run config: named configs load, overrides apply with types, bad values are one-line errors."""

import pytest

from rosa_ds.config import config_help, load_config, named_configs, parse_override
from rosa_ds.errors import UserError


def test_named_configs_ship_and_validate():
    assert {"tiny-lora", "smollm2-lora"} <= set(named_configs())
    for name in named_configs():
        load_config(name)


def test_overrides_apply_with_types():
    cfg = load_config(
        "tiny-lora",
        [
            "adapter.rank=4",
            "adapter.alpha=8",
            "train.lr=1e-4",
            "adapter.targets=[q_proj,v_proj]",
            "output_dir=/tmp/x",
            "train.max_steps=3",
            "adapter.dropout=0.1",
        ],
    )
    assert cfg.adapter.rank == 4 and cfg.adapter.alpha == 8.0
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.adapter.targets == ["q_proj", "v_proj"]
    assert cfg.output_dir == "/tmp/x" and cfg.train.max_steps == 3
    assert cfg.adapter.dropout == pytest.approx(0.1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.rnak=4", "did you mean adapter.rank"),
        ("train.max_steps=abc", "train.max_steps must be an integer"),
        ("adapter.rank=0", "adapter.rank must be > 0"),
        ("adapter.rank=-3", "adapter.rank must be >= 0"),
        ("adapter.dropout=1.5", "adapter.dropout must be in [0, 1)"),
        ("train.precision=fp8", "train.precision must be one of"),
        ("adapter.robust.sparse_lr=0", "adapter.robust.sparse_lr must be > 0"),
        ("data.difficulty=0", "data.difficulty must be from 1 to 12"),
        ("adapter.robust.sparse_lr=fast", "adapter.robust.sparse_lr must be a number"),
        ("train.global_batch_size=7", "must be a positive multiple"),
        ("model.trust_remote_code=maybe", "must be true or false"),
        ("nonsense", "must look like key=value"),
        ("train=3", "must be a section"),
        ("adapter.method=rosa", "adapter.method must be one of"),
        ("adapter.method=robust", "adapter.method=robust needs adapter.rank > 0, adapter.density"),
        ("adapter.method=subspace", "but the keys describe lora"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError, match=None) as info:
        load_config("tiny-lora", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter: [rank: 4\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="unknown config"):
        load_config("no-such-config")


def test_override_parsing_keeps_strings():
    assert parse_override("model.name_or_path=builtin:tiny-llama") == (
        "model.name_or_path",
        "builtin:tiny-llama",
    )
    assert parse_override("data.eval_split=null") == ("data.eval_split", None)


def test_help_lists_every_key():
    text = config_help()
    for key in (
        "output_dir",
        "train.max_steps",
        "adapter.rank",
        "adapter.alpha",
        "adapter.dropout",
        "adapter.targets",
    ):
        assert f"\n{key} = " in "\n" + text


def test_wheel_ships_every_deepspeed_config(tmp_path):
    """A non-editable install must find deepspeed.config=zero2 etc. too."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # build from a copy: the build leaves a build/ folder behind
    for name in ("setup.cfg", "pyproject.toml", "README.md", "rosa_ds", "launcher", "ds_configs"):
        if (repo / name).is_dir():
            shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(repo / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + [str(src), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[1] for n in names if "/share/rosa-ds/ds_configs/" in n}
    assert shipped == {p.name for p in (repo / "ds_configs").glob("*.json")}
    assert any(n.startswith("rosa_ds/configs/") and n.endswith(".yaml") for n in names)


def test_restart_warmup_is_a_pass_of_its_own():
    """With after_mask=restart max_steps counts the main pass alone, so a warm-up longer than it
    is fine; with continue the warm-up is part of the run and must fit in it."""
    cfg = load_config("tiny-robust", ["train.max_steps=4", "adapter.robust.mask_warmup_steps=8"])
    assert cfg.train.max_steps == 4
    with pytest.raises(UserError, match="which after_mask=continue counts them in"):
        load_config(
            "tiny-robust",
            [
                "train.max_steps=4",
                "adapter.robust.mask_warmup_steps=8",
                "adapter.robust.after_mask=continue",
            ],
        )


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup, total", [(0, 5), (3, 10), (10, 10), (4, 3)])
def test_schedule_equals_transformers(kind, warmup, total):
    """rosa_ds.schedule gives transformers' learning rates at every step (past the end too)."""
    import torch
    from transformers import get_scheduler

    from rosa_ds.schedule import build_scheduler

    def lrs(sched):
        out = []
        for _ in range(total + 4):
            out.append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
        return out

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    ours = lrs(build_scheduler(opt(), kind, warmup, total))
    theirs = lrs(get_scheduler(kind, opt(), num_warmup_steps=warmup, num_training_steps=total))
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_method_follows_the_keys_or_is_named():
    assert load_config("tiny-lora").adapter.method_name == "lora"
    assert load_config("tiny-robust").adapter.method_name == "robust"
    assert load_config("tiny-robust", ["adapter.rank=0"]).adapter.method_name == "sparse"
    assert load_config("tiny-subspace").adapter.method_name == "subspace"
    hybrid = load_config("tiny-subspace", ["adapter.density=0.05"])
    assert hybrid.adapter.method_name == "hybrid"
    named = load_config("tiny-subspace", ["adapter.density=0.05", "adapter.method=hybrid"])
    assert named.adapter.method_name == "hybrid"
    assert load_config("tiny-full").adapter.method_name == "full"
    for keys in (["adapter.density=0.05"], ["adapter.resample_every=5"]):
        with pytest.raises(UserError, match="adapter.method=full needs"):
            load_config("tiny-full", keys)


def test_hub_kernels_are_off_unless_asked_for(tiny_model_path):
    """transformers 5 swaps layers for hub kernels by default; offline on a CUDA GPU the first
    ``model.train()`` then stops on a missing download, and a swapped layer is not the one the
    adapters wrap. rosa-ds loads with them off; ``model.hub_kernels=true`` asks for them."""
    import torch
    from transformers import PreTrainedModel

    from rosa_ds.config import ModelConfig
    from rosa_ds.model import load_model

    if not hasattr(PreTrainedModel, "set_use_kernels"):
        pytest.skip("this transformers has no hub kernels")
    off = ModelConfig(name_or_path=tiny_model_path)
    assert off.pretrained_kwargs()["use_kernels"] is False
    assert ModelConfig(hub_kernels=True).pretrained_kwargs()["use_kernels"] is True
    model = load_model(tiny_model_path, off, torch.float32)
    model.train()
    assert model.use_kernels is False
    assert load_config("tiny-lora", ["model.hub_kernels=true"]).model.hub_kernels is True


def test_hub_kernels_on_a_transformers_without_them_is_one_clear_error(monkeypatch):
    from transformers import PreTrainedModel

    from rosa_ds.config import ModelConfig

    monkeypatch.delattr(PreTrainedModel, "set_use_kernels", raising=False)
    assert "use_kernels" not in ModelConfig().pretrained_kwargs()
    with pytest.raises(UserError, match="model.hub_kernels=true needs"):
        ModelConfig(hub_kernels=True).pretrained_kwargs()
