"""Cost model: work from shapes (closed forms), coefficient recovery, retargeting, comm fits."""

import json

import numpy as np
import pytest

from simulator.costmodel import (
    DEVICES,
    CommModel,
    CostModel,
    DeviceSpec,
    classify,
    fit_comm,
    fit_cost_model,
    fit_kind,
    op_work,
    roofline_us,
    wire_bytes,
)
from simulator.errors import SimulationError


def test_classify_aten_and_kernel_names():
    assert classify("aten::addmm") == "gemm"
    assert classify("aten::_grouped_mm") == "grouped_gemm"
    assert classify("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert classify("aten::_fused_rms_norm") == "norm"
    assert classify("aten::_softmax") == "norm"
    assert classify("aten::index_add_") == "movement"
    assert classify("aten::silu") == "elementwise"
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert classify("flash_fwd_kernel") == "attention"
    assert classify("aten::topk") == "other"


def test_gemm_work_closed_forms():
    # addmm(bias[N], a[M,K], b[K,N]) = 2MKN + MN FLOPs; bytes = N + MK + KN + MN floats.
    w = op_work("aten::addmm", [[256], [64, 128], [128, 256], [], []], ["float"] * 3 + ["Scalar"] * 2)
    assert w.kind == "gemm"
    assert w.flops == 2 * 64 * 128 * 256 + 64 * 256
    assert w.bytes == 4 * (256 + 64 * 128 + 128 * 256 + 64 * 256)
    # linear x[2,32,128] w[256,128] no bias: 2·64·128·256
    w = op_work("aten::linear", [[2, 32, 128], [256, 128], []], ["c10::BFloat16", "c10::BFloat16", ""])
    assert w.flops == 2 * 64 * 128 * 256
    assert w.bytes == 2 * (64 * 128 + 256 * 128 + 64 * 256)
    # matmul broadcasting a[8,16,32] @ b[32,4] → [8,16,4]
    w = op_work("aten::matmul", [[8, 16, 32], [32, 4]], ["float", "float"])
    assert w.flops == 2 * 8 * 16 * 32 * 4
    # bmm
    assert op_work("aten::bmm", [[8, 16, 32], [8, 32, 16]], ["float", "float"]).flops == 2 * 8 * 16 * 32 * 16
    # grouped: a[40,128] b[4,128,64] → 2·40·128·64
    w = op_work("aten::_grouped_mm", [[40, 128], [4, 128, 64], [4], [], []], ["float", "float", "int", "", ""])
    assert w.kind == "grouped_gemm" and w.flops == 2 * 40 * 128 * 64


def test_weight_bytes_are_the_fixed_part():
    """Bytes that do not grow with tokens: linear's weight and bias; addmm's bias and weight
    when its first input is a bias vector; a grouped GEMM's per-group weights, or the
    weight gradient it writes. Activations are never fixed."""
    f32 = ["float"] * 3
    assert op_work("aten::linear", [[64, 128], [256, 128], [256]], f32).fixed_bytes == 4 * (256 * 128 + 256)
    assert op_work("aten::addmm", [[256], [64, 128], [128, 256]], f32).fixed_bytes == 4 * (256 + 128 * 256)
    assert op_work("aten::addmm", [[64, 256], [64, 128], [128, 256]], f32).fixed_bytes == 0
    assert op_work("aten::_grouped_mm", [[40, 128], [4, 128, 64]], f32).fixed_bytes == 4 * 4 * 128 * 64
    assert op_work("aten::_grouped_mm", [[4, 128, 40], [40, 64]], f32).fixed_bytes == 4 * 4 * 128 * 64
    # a plain mm's operands cannot be told apart by shape: nothing fixed (attach_work gives
    # backward nodes theirs from their forward op); elementwise ops never have weights
    assert op_work("aten::mm", [[64, 256], [256, 128]], f32).fixed_bytes == 0
    assert op_work("aten::mul", [[256, 128], [256, 128]], f32).fixed_bytes == 0


def test_attention_elementwise_norm_movement_work():
    q = [2, 4, 16, 32]
    w = op_work("aten::_scaled_dot_product_flash_attention_for_cpu", [q, q, q, [], []], ["float"] * 3 + ["Scalar"] * 2)
    assert w.kind == "attention"
    assert w.flops == 2 * 8 * 16 * 16 * 64 + 5 * 8 * 16 * 16
    w = op_work("aten::mul", [[64, 256], [64, 256]], ["float", "float"])
    assert (w.flops, w.bytes) == (64 * 256, 3 * 4 * 64 * 256)
    w = op_work("aten::_fused_rms_norm", [[64, 256], [], [], []], ["float", "ScalarList", "", ""])
    assert w.kind == "norm" and w.flops == 5 * 64 * 256 and w.bytes == 2 * 4 * 64 * 256
    w = op_work("aten::cat", [[[64, 128], [64, 128]], []], ["TensorList", "Scalar"])
    assert w.kind == "movement" and w.flops == 0 and w.bytes == 2 * 4 * 2 * 64 * 128
    # composite and backward nodes carry no work of their own (children are recorded)
    assert op_work("aten::einsum", [[], [[2, 3], [3, 4]], []], ["", "TensorList", ""]).flops == 0
    assert op_work("AddmmBackward0", [[64, 256]], ["float"]).flops == 0


@pytest.mark.parametrize("combine", ["sum", "max"])
def test_fit_recovers_known_coefficients(combine):
    rng = np.random.default_rng(7)
    flops = 10 ** rng.uniform(5, 10, 200)
    nbytes = 10 ** rng.uniform(4, 8, 200)
    overhead, us_per_mflop, us_per_mb = 6.0, 0.02, 0.15
    f, b = us_per_mflop * flops / 1e6, us_per_mb * nbytes / 1e6
    t = overhead + (f + b if combine == "sum" else np.maximum(f, b))
    t = t * (1 + 0.01 * rng.standard_normal(len(t)))  # 1% noise
    fit = fit_kind("gemm", flops, nbytes, t)
    assert fit.combine == combine
    assert fit.overhead_us == pytest.approx(overhead, rel=0.05)
    assert fit.us_per_mflop == pytest.approx(us_per_mflop, rel=0.03)
    assert fit.us_per_mb == pytest.approx(us_per_mb, rel=0.03)
    assert fit.median_abs_rel_err < 0.02


def test_fit_keeps_rates_non_negative_and_needs_points():
    # durations that fall with bytes would need a negative rate: clamp it to 0
    fit = fit_kind("elementwise", [0, 0, 0, 0], [1e6, 2e6, 3e6, 4e6], [10, 9, 8, 7])
    assert fit.us_per_mb == 0 and fit.us_per_mflop == 0 and fit.overhead_us > 0
    with pytest.raises(SimulationError, match="need ≥ 3"):
        fit_kind("norm", [1, 2], [1, 2], [1, 2])


def test_cost_model_fallback_retarget_and_round_trip():
    dev = DeviceSpec("dev", 100e12, 1e12, 5.0)
    rng = np.random.default_rng(0)
    flops = 10 ** rng.uniform(9, 12, 50)
    nbytes = 10 ** rng.uniform(6, 9, 50)
    t = 5.0 + np.maximum(flops / 70e12, nbytes / 0.8e12) * 1e6
    model = fit_cost_model(dev, ["gemm"] * 50, flops, nbytes, t)
    assert set(model.fits) == {"gemm"}
    # never-measured kinds use the documented roofline
    assert model.predict_us("norm", 0, 1e9) == roofline_us("norm", 0, 1e9, dev)
    # a device with 2x FLOP/s and 3x bandwidth: compute-bound op takes half the time
    other = DeviceSpec("other", 200e12, 3e12, 5.0)
    moved = model.retarget(other)
    big_gemm = (1e13, 1e6)
    assert moved.predict_us("gemm", *big_gemm) - 5.0 == pytest.approx((model.predict_us("gemm", *big_gemm) - 5.0) / 2, rel=1e-6)
    back = CostModel.from_json(json.loads(json.dumps(model.to_json())))
    assert back.predict_us("gemm", *big_gemm) == pytest.approx(model.predict_us("gemm", *big_gemm))
    assert "H800" in DEVICES


def test_comm_alpha_beta_recovery_and_wire_bytes():
    # all_reduce at n=4: wire = 2·3/4·m; t = 30 µs + wire / (2 GB/s)
    m = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    t = 30 + 1.5 * m / 2e3
    fit = fit_comm("all_reduce", 4, m, t)
    assert fit.latency_us == pytest.approx(30, rel=1e-6)
    assert fit.bandwidth_gbps == pytest.approx(2.0, rel=1e-6)
    model = CommModel({("all_reduce", 4): fit})
    assert model.predict_us("all_reduce", 4, 2e6) == pytest.approx(30 + 1.5 * 2e6 / 2e3)
    # all-to-all-v: only the bytes to other ranks go on the wire
    assert wire_bytes("all_to_all", 3, 600, [100, 200, 300], rank_in_group=1) == 400
    assert wire_bytes("all_gather", 4, 100) == 300
    rows = json.loads(json.dumps(model.to_json()))
    assert CommModel.from_json(rows).predict_us("all_reduce", 4, 5e5) == pytest.approx(model.predict_us("all_reduce", 4, 5e5))
    with pytest.raises(SimulationError, match="nothing calibrated"):
        CommModel().predict_us("all_to_all", 2, 10)
