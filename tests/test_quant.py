"""4-bit frozen weights: the records, the quantized layer against a dense layer holding the
dequantized weight, loading, masks and ROSA resampling on 4-bit, ZeRO-3 sharding of the records,
checkpoints and export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from rosa_ds.adapters.layer import AdaptedLinear
from rosa_ds.config import load_config
from rosa_ds.errors import UserError
from rosa_ds.quant.linear import QuantizedLinear
from rosa_ds.quant.nf4 import QuantSpec, bytes_per_param, dequantize, quantize
from tests.helpers import run_probe, train_ok


def _dense_twin(q: QuantizedLinear) -> nn.Linear:
    """An nn.Linear holding the dequantized weight (in the compute dtype)."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    lin = lin.to(q.compute_dtype)
    with torch.no_grad():
        lin.weight.copy_(q.dequantized())
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    lin.requires_grad_(False)
    return lin


# --- the records ---------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_records_dequantize_exactly_as_bitsandbytes(quant_type, double_quant, dtype):
    import bitsandbytes.functional as bnb_f

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    spec = QuantSpec(tuple(w.shape), quant_type, 64, double_quant)
    q = quantize(w, spec)
    assert q.dtype == torch.uint8 and q.numel() == spec.nbytes
    packed, state = bnb_f.quantize_4bit(
        w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type
    )
    torch.testing.assert_close(
        dequantize(q, spec, dtype), bnb_f.dequantize_4bit(packed, state), rtol=0, atol=0
    )
    err = float((dequantize(q, spec).float() - w.float()).norm() / w.float().norm())
    assert 0.05 < err < (0.11 if quant_type == "nf4" else 0.14), err
    # bytes per parameter: 0.5 packed + 4/64 (fp32 scales) or ~1/64 (double-quantized)
    assert bytes_per_param(spec) == pytest.approx(0.5625 if not double_quant else 0.5159, abs=1e-3)


def test_records_pad_partial_blocks_and_keep_scales_beside_their_bytes():
    w = torch.randn(7, 50)  # 350 weights: 6 blocks, the last one partial
    spec = QuantSpec((7, 50), "nf4", 64, False)
    assert spec.blocks == 6 and spec.nbytes == 6 * 36
    back = dequantize(quantize(w, spec), spec)
    assert back.shape == (7, 50) and float((back - w).norm() / w.norm()) < 0.12
    # any half of the records holds about half of the packed bytes and half of the scales
    big = QuantSpec((576, 1536), "nf4", 64, True)
    whole = big.component_bytes()
    first = big.component_bytes(0, big.nbytes // 2)
    assert whole["packed"] == 576 * 1536 // 2
    assert first["packed"] / whole["packed"] == pytest.approx(0.5, abs=0.01)
    assert first["scales"] / whole["scales"] == pytest.approx(0.5, abs=0.01)


# --- the layer ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_layer_equals_dense_layer_with_dequantized_weight(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=bias)
    q = QuantizedLinear.from_weight(
        lin.weight.detach(), lin.bias.detach() if bias else None, compute_dtype=dtype
    )
    dense = _dense_twin(q)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = q(x), dense(x2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    assert q.qweight.grad is None and not q.qweight.requires_grad
    # and it is the quantized weight, not the original one
    assert not torch.allclose(dense.weight.float(), lin.weight.float(), atol=1e-3)


def test_no_dequantized_weight_is_kept_from_forward_to_backward():
    """Autograd saves nothing of the weight's size: backward dequantizes again."""
    torch.manual_seed(0)
    q = QuantizedLinear.from_weight(torch.randn(96, 128), None, compute_dtype=torch.float32)
    layer = AdaptedLinear(q, rank=4, alpha=8)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), isinstance(t, nn.Parameter)))
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    full = {(96, 128), (128, 96)}  # the weight or its transpose
    assert not [s for s, param in saved if s in full and not param], saved
    y.sum().backward()
    # the same check catches a plain dense layer that keeps its weight
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.linear(x, q.dequantized())
    assert [s for s, _ in saved if s in full]


def test_adapter_on_quantized_base_trains_like_adapter_on_dense_base():
    torch.manual_seed(0)
    q = QuantizedLinear.from_weight(
        torch.randn(48, 64), torch.randn(48), compute_dtype=torch.float32
    )
    twin = _dense_twin(q)
    torch.manual_seed(1)
    a = AdaptedLinear(q, rank=4, alpha=8)
    torch.manual_seed(1)
    b = AdaptedLinear(twin, rank=4, alpha=8)
    with torch.no_grad():
        a.lora_B.normal_()
        b.lora_B.copy_(a.lora_B)
    x = torch.randn(6, 64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(a.lora_A.grad, b.lora_A.grad)
    torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad)
    assert a.frozen.device == torch.device("cpu")
    torch.testing.assert_close(a.delta_weight(), b.delta_weight())


# --- config and loading -------------------------------------------------------------------


def test_quant_config_validation():
    cfg = load_config("tiny-lora", ["quant.bits=4", "quant.type=fp4", "quant.double_quant=false"])
    assert cfg.quant.enabled and cfg.quant.type == "fp4" and cfg.quant.block_size == 64
    for bad in ("quant.bits=8", "quant.block_size=48", "quant.type=int4", "quant.bitz=4"):
        with pytest.raises(UserError):
            load_config("tiny-lora", [bad])


@pytest.mark.parametrize("all_linear", [False, True])
def test_streaming_load_equals_load_then_quantize(tiny_model_path, all_linear):
    """The layer-by-layer loader (never the whole model in full precision) gives exactly the
    model that from_pretrained + quantization gives; the head is never quantized."""
    from rosa_ds.model import load_model
    from rosa_ds.quant.files import quantized_layers
    from rosa_ds.quant.load import frozen_bytes, quant_targets, quantize_model

    cfg = load_config(
        "tiny-lora",
        ["quant.bits=4", f"quant.all_linear={str(all_linear).lower()}", "adapter.targets=[q_proj]"],
    )
    streamed = load_model(tiny_model_path, cfg.model, torch.bfloat16, cfg.quant, cfg.adapter)
    plain = load_model(tiny_model_path, cfg.model, torch.bfloat16)
    names = quant_targets(plain, cfg.adapter, cfg.quant)
    quantize_model(plain, names, cfg.quant, torch.bfloat16)
    assert sorted(quantized_layers(streamed)) == names
    assert len(names) == (14 if all_linear else 2) and "lm_head" not in names
    a, b = streamed.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fb = frozen_bytes(streamed)
    assert fb["local"] == fb["total"] and fb["total"] / fb["params"] < 0.57


# --- masks on 4-bit -----------------------------------------------------------------------


def test_masks_on_4bit_equal_masks_on_dequantized_weights(tiny_model_path):
    """Mask generation needs only dY^T X: on 4-bit layers it gives the masks (and accumulators)
    that the same model with the dequantized weights in dense layers gives."""
    from rosa_ds.adapters.inject import adapted_modules, inject_adapters
    from rosa_ds.adapters.masks import GradientCollector
    from rosa_ds.model import load_model
    from rosa_ds.quant.files import quantized_layers

    cfg = load_config("tiny-robust", ["quant.bits=4", "train.precision=bf16"])
    quantized = load_model(tiny_model_path, cfg.model, torch.bfloat16, cfg.quant, cfg.adapter)
    dense = load_model(tiny_model_path, cfg.model, torch.bfloat16)
    for name, q in quantized_layers(quantized).items():
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(q.dequantized(torch.bfloat16))
    masks = []
    collectors = []
    for model in (quantized, dense):
        torch.manual_seed(3)
        inject_adapters(model, cfg.adapter)
        for m in adapted_modules(model).values():
            with torch.no_grad():
                m.lora_B.normal_(std=0.02)
        c = GradientCollector(model, cfg.adapter)
        c.start()
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            ids = torch.randint(4, 90, (2, 24), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            c.count_micro_batch()
        c.stop()
        masks.append(c.select(cfg.adapter))
        collectors.append(c)
    assert masks[0].keys() == masks[1].keys() and len(masks[0]) == 14
    for name in masks[0]:
        acc = collectors[0].full_accumulator(name)
        assert acc.abs().sum() > 0, name
        torch.testing.assert_close(acc, collectors[1].full_accumulator(name), rtol=0, atol=0)
        assert torch.equal(masks[0][name].col_idx, masks[1][name].col_idx), name
        assert torch.equal(masks[0][name].row_ptr, masks[1][name].row_ptr), name


# --- ROSA resampling on 4-bit -------------------------------------------------------------


def test_resample_on_4bit_changes_outputs_within_the_reported_error_bound():
    """One resample re-quantizes W_fixed; each token's output moves by at most
    ||deq(q(W_fixed)) - W_fixed||_F * ||x||, the error the report gives."""
    from rosa_ds.adapters.resample import resample_all

    torch.manual_seed(0)
    layers = [
        AdaptedLinear(
            QuantizedLinear.from_weight(torch.randn(o, i), None, compute_dtype=torch.float32),
            4,
            8.0,
        )
        for o, i in ((48, 64), (64, 32))
    ]
    model = nn.ModuleDict({"a": layers[0], "b": layers[1]})
    for m in layers:
        with torch.no_grad():
            m.lora_B.normal_()
    xs = [torch.randn(10, m.in_features) for m in layers]
    exact = []
    before = []
    with torch.no_grad():
        for m, x in zip(layers, xs, strict=True):
            before.append(m(x))
            exact.append(m.base.dequantized() + m.scale * m.lora_B @ m.lora_A)  # W' of the merge
    report = resample_all(
        model, sampling="random_block", split="balanced", seed=0, count=0, has_optimizer=False
    )
    assert sorted(report.requant) == ["a", "b"]
    summary = report.requant_summary()
    assert 0.02 < summary["rel_max"] < 0.15, summary
    for (name, m), x, y0, w_merged in zip(
        (("a", layers[0]), ("b", layers[1])), xs, before, exact, strict=True
    ):
        err = report.requant[name]
        with torch.no_grad():
            y1 = m(x)
            w_now = m.base.dequantized() + m.scale * m.lora_B @ m.lora_A
        # the reported error is the change of the merged weight, measured independently
        assert float((w_now - w_merged).norm()) == pytest.approx(err["abs"], rel=1e-3, abs=1e-4)
        bound = err["abs"] * x.norm(dim=1) + 1e-4
        change = (y1 - y0).norm(dim=1)
        assert (change <= bound).all(), (change, bound)
        assert change.max() > 0.1 * bound.max()  # it did move: the bound is not vacuous


# --- training, sharding, checkpoints, export (real runs) ----------------------------------

COMMON = ["train.lr=1e-2", "eval.num_generate=2", "quant.bits=4"]


@pytest.mark.slow
def test_one_process_training_lowers_loss_resume_and_export(tmp_path):
    """1 process (ZeRO-2): loss goes down; a ROSA run resumed from a checkpoint with rewritten
    4-bit records continues the same losses; the merged bf16/fp32 export computes what the
    4-bit model computed."""
    out = tmp_path / "run"
    s = train_ok(
        [
            "--config",
            "tiny-subspace",
            f"output_dir={out}",
            "train.max_steps=10",
            "train.save_every=5",
            *COMMON,
        ]
    )
    assert (
        s["losses"][-1] < s["losses"][0] - 0.1
        and s["after"]["eval_loss"] < s["before"]["eval_loss"]
    )
    assert len(s["requant_errors"]) == 2  # at start, at step 5 (and none at the end)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["requant_rel_total"] for r in logged if "requant_rel_total" in r] == [
        e["rel_total"] for e in s["requant_errors"]
    ]
    ckpt = out / "checkpoints" / "step-000005"
    from rosa_ds.adapters.subspace_io import load_frozen_tensors

    records = load_frozen_tensors(ckpt)
    assert records["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    # resume from step 5: the rewritten records come back and the losses continue identically
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000010")
    (resumed / "checkpoints" / "latest").write_text("step-000005")
    (resumed / "summary.json").unlink()
    r = train_ok(
        [
            "--config",
            "tiny-subspace",
            f"output_dir={resumed}",
            "train.max_steps=10",
            "train.save_every=5",
            *COMMON,
            "--resume",
        ]
    )
    torch.testing.assert_close(
        torch.tensor(r["losses"]), torch.tensor(s["losses"]), rtol=1e-5, atol=1e-6
    )
    _export_matches_the_4bit_model(out, tmp_path)


def _export_matches_the_4bit_model(out, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rosa_ds.export import export
    from rosa_ds.model import resolve_model_path

    written = export(out / "adapter", tmp_path / "export")
    merged = AutoModelForCausalLM.from_pretrained(written["merged"], dtype=torch.float32)
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["quant"]["type"] == "nf4" and len(meta["quant"]["modules"]) == 14
    assert meta["quant"]["source_dtype"] == "fp32"
    assert meta["exact_frozen"]
    cfg = load_config("tiny-subspace")
    adapter = load_file(str(out / "adapter" / "adapter.safetensors"))
    records = load_file(str(out / "adapter" / "frozen.safetensors"))
    ids = torch.randint(4, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    # the same function built independently, in dense layers: the final records dequantized
    # plus s B A, what the 4-bit model computed; and deq(q(W_0)) + delta_B delta_A, the
    # factorized update, which lacks the full-rank re-quantization error
    exact, factorized = (
        AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=torch.float32)
        for _ in range(2)
    )
    scale = meta["alpha"] / meta["rank"]
    for name in meta["quant"]["modules"]:
        lin, lin_f = exact.get_submodule(name), factorized.get_submodule(name)
        spec = QuantSpec(tuple(lin.weight.shape), "nf4", 64, True)
        with torch.no_grad():
            lora = scale * adapter[f"{name}.lora_B"] @ adapter[f"{name}.lora_A"]
            lin.weight.copy_(dequantize(records[f"{name}.qweight"], spec) + lora)
            w0 = dequantize(quantize(lin_f.weight.detach(), spec), spec)
            lin_f.weight.copy_(w0 + adapter[f"{name}.delta_B"] @ adapter[f"{name}.delta_A"])
    with torch.no_grad():
        want = exact(input_ids=ids).logits
        approx = factorized(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (approx - want).abs().max() > 1e-3  # why the records are carried
    # and the unquantized base would be a different model
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=torch.float32)
    with torch.no_grad():
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_ranks_training_lowers_loss(tmp_path):
    out = tmp_path / "run"
    s = train_ok(
        [
            "--config",
            "tiny-lora",
            f"output_dir={out}",
            "train.max_steps=8",
            "deepspeed.config=zero3",
            *COMMON,
        ],
        nproc=2,
        launcher="ranks",
    )
    assert s["world_size"] == 2 and s["zero_stage"] == 3
    first, last = sum(s["losses"][:2]) / 2, sum(s["losses"][-2:]) / 2
    assert last < first - 0.1, s["losses"]
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_each_rank_holds_half_of_the_records_and_resample_error_bounds_logits(tmp_path):
    """2 ranks, ZeRO-3: each rank's partitions (measured from ds_tensor) hold about half of the
    packed bytes and half of the scales, are exact slices of the records one process makes, and
    a training step needs no gather beyond DeepSpeed's own; a resample re-quantizes with the
    error it reports, and the logits move by about that relative amount, no more."""
    out = tmp_path / "probe.json"
    proc = run_probe(
        "quant_probe.py",
        [str(out), "tiny-subspace", "deepspeed.config=zero3", f"output_dir={tmp_path / 'run'}"],
        nproc=2,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads(out.read_text()), json.loads((tmp_path / "probe.rank1.json").read_text())]
    total = ranks[0]["bytes"]
    assert sum(r["bytes"]["local"] for r in ranks) == total["total"]
    for r in ranks:
        b = r["bytes"]
        assert r["zero_stage"] == 3 and b["total"] / b["params"] < 0.57
        assert 0.45 < b["local"] / b["total"] < 0.55, b
        assert 0.45 < b["local_packed"] / b["total_packed"] < 0.55, b
        assert 0.4 < b["local_scales"] / b["total_scales"] < 0.6, b
        assert all(n == 0 for n in r["held_numel"].values())  # partitioned outside forward
        assert r["slices_match"] and r["records_match_single_process"]
        assert r["own_gathers_in_training"] == 0
    req = ranks[0]["requant"][0]
    assert req == ranks[1]["requant"][0]  # every rank got the owners' errors
    assert 0.01 < req["rel_total"] < 0.15
    assert 0 < ranks[0]["logit_change_rel"] <= 1.5 * req["rel_max"], (ranks[0], req)
