"""Compute and communication cost models: op shapes → work → predicted duration.

Three layers, each small enough to explain:

1. Work from shapes (`op_work`): FLOPs and bytes of an aten op from the profiler's
   `Input Dims` / `Input type` args (record_shapes=True), and its kind (`classify`):
   gemm, grouped_gemm, attention, elementwise, norm (norms and softmax), movement
   (index / gather / scatter / cat / copy) or other.
2. A fitted model per kind (`KindFit`), least squares on measured (flops, bytes, µs):
       sum form:  t_us = overhead_us + us_per_mflop · MFLOP + us_per_mb · MB
       max form:  t_us = overhead_us + max(us_per_mflop · MFLOP, us_per_mb · MB)
   The max form is the roofline; the sum form is the roofline with an efficiency curve
   eff(f) = f / (f + f_half) (time = f/peak + f_half/peak is linear in f), and also
   fits CPUs, where compute and memory traffic do not overlap fully. `fit_kind` fits
   both with non-negative coefficients, weighting each point by 1/t (relative error,
   since durations span orders of magnitude), and keeps the better one.
3. A roofline fallback for kinds or devices never measured (`DeviceSpec` +
   `DEFAULT_EFFICIENCY`), and `CostModel.retarget(device)` which carries fitted
   efficiencies to another device by the ratio of their peak FLOP/s and bytes/s.

The comm model (`CommFit`, `CommModel`) is alpha-beta per collective and group size:
       t_us = latency_us + wire_bytes / bytes_per_us,   wire_bytes = factor · coll_bytes
with the ring algorithm's factor (`wire_factor`): all_reduce 2(n−1)/n, all_gather n−1
(coll_bytes is the input message), reduce_scatter and all_to_all (n−1)/n, send / recv /
broadcast 1. All-to-all-v uses the bytes sent to other ranks (its splits minus its own).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from simulator.errors import SimulationError

OP_KINDS = ("gemm", "grouped_gemm", "attention", "elementwise", "norm", "movement", "other")
OpKind = Literal["gemm", "grouped_gemm", "attention", "elementwise", "norm", "movement", "other"]

MFLOP = 1e6
MB = 1e6

# Profiler `Input type` strings → bytes per element.
DTYPE_BYTES = {
    "float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "c10::Float8_e4m3fn": 1,
    "c10::Float8_e5m2": 1, "long int": 8, "int": 4, "short int": 2, "signed char": 1,
    "unsigned char": 1, "bool": 1, "c10::complex<float>": 8,
}

# ---------------------------------------------------------------------------------------
# classification

_GEMM_OPS = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "addbmm", "einsum", "_addmm_activation"}
_GROUPED_OPS = {"_grouped_mm", "grouped_mm", "_scaled_grouped_mm"}
_NORM_OPS = {
    "rms_norm", "_fused_rms_norm", "layer_norm", "native_layer_norm", "group_norm",
    "native_group_norm", "batch_norm", "softmax", "_softmax", "log_softmax", "_log_softmax",
    "_softmax_backward_data", "_log_softmax_backward_data", "native_layer_norm_backward",
    "_fused_rms_norm_backward",
}
_MOVEMENT_OPS = {
    "index", "index_select", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_",
    "index_add", "index_add_", "index_put", "index_put_", "_index_put_impl_", "cat", "stack",
    "copy_", "clone", "contiguous", "_to_copy", "to", "embedding", "embedding_dense_backward",
    "masked_select", "index_copy", "index_copy_", "repeat_interleave", "repeat",
    "gather_backward", "index_select_backward", "scatter_reduce", "index_reduce",
}
_ELEMENTWISE_OPS = {
    "add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "silu", "silu_", "gelu", "relu",
    "relu_", "sigmoid", "exp", "neg", "pow", "rsqrt", "sqrt", "tanh", "where", "masked_fill",
    "masked_fill_", "clamp", "clamp_", "silu_backward", "gelu_backward", "sigmoid_backward",
    "threshold_backward", "tanh_backward", "mean", "sum", "fill_", "zero_", "type_as", "abs",
    "reciprocal", "cos", "sin", "log", "addcmul_", "addcdiv_", "lerp_", "_foreach_add_",
    "_foreach_mul_", "_foreach_addcmul_", "_foreach_addcdiv_", "_foreach_sqrt", "_foreach_div_",
    "maximum", "minimum", "eq", "ne", "lt", "gt", "le", "ge", "cumsum", "dropout", "mse_loss",
    "nll_loss_forward", "nll_loss_backward", "sgn", "square", "erf",
}
_ATTENTION_RE = re.compile(r"scaled_dot_product|flash|fmha|attention|efficient_attention", re.I)
_KERNEL_GEMM_RE = re.compile(r"gemm|cutlass|cublas|matmul|wgmma|\bmm\b", re.I)


AUTOGRAD_NODE = "autograd::engine::evaluate_function: "


def _aten_name(name: str) -> str:
    """'aten::addmm' → 'addmm'; backward nodes keep their name ('AddmmBackward0', also from
    the profiler's 'autograd::engine::evaluate_function: AddmmBackward0')."""
    return name.split("::", 1)[1] if name.startswith("aten::") else name.removeprefix(AUTOGRAD_NODE)


def classify(name: str) -> OpKind:
    """The op kind of an aten op or GPU kernel name (unknown names → "other")."""
    base = _aten_name(name)
    if base in _GROUPED_OPS or "grouped_mm" in base or "grouped_gemm" in base.lower():
        return "grouped_gemm"
    if _ATTENTION_RE.search(base):
        return "attention"
    if base in _GEMM_OPS or base.startswith(("Mm", "Addmm", "Bmm", "Baddbmm")) or _KERNEL_GEMM_RE.search(base):
        return "gemm"
    if base in _NORM_OPS or re.search(r"norm|softmax", base, re.I):
        return "norm"
    if base in _MOVEMENT_OPS or re.search(r"gather|scatter|index|memcpy|copy|cat_", base, re.I):
        return "movement"
    if base in _ELEMENTWISE_OPS or re.search(r"elementwise|vectorized|reduce_kernel", base, re.I):
        return "elementwise"
    return "other"


# Ops that return views or metadata: their time is dispatch overhead, whatever the size of
# the tensors (measured on `small`: split / unbind / split_with_sizes of the expert rows kept
# their time when the rows fell to 0.38x).
_VIEW_OPS = frozenset({
    "view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "narrow", "as_strided",
    "expand", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "chunk", "detach", "alias",
    "view_as", "expand_as",
})  # (reshape / flatten copy when they must: the copy nested in them counts)


def is_view(name: str) -> bool:
    """True for an aten op that returns a view (no data moves, its time does not grow)."""
    return _aten_name(name) in _VIEW_OPS


# ---------------------------------------------------------------------------------------
# work from shapes


@dataclass(frozen=True)
class OpWork:
    """Work of one op: its kind, FLOPs and bytes read + written (HBM / DRAM traffic);
    fixed_bytes: the part of `bytes` that does not grow with the tokens (weights read,
    weight gradients written), which a batch or routing what-if keeps."""

    kind: OpKind
    flops: float
    bytes: float
    fixed_bytes: float = 0.0


def _numel(dims: Sequence[int]) -> int:
    return int(np.prod(dims)) if len(dims) else 1


def _tensors(dims: Sequence, types: Sequence[str]) -> list[tuple[list[int], int]]:
    """(shape, itemsize) of each tensor argument; TensorLists flattened; scalars dropped."""
    out: list[tuple[list[int], int]] = []
    for d, t in itertools.zip_longest(dims, types, fillvalue=""):
        if t == "TensorList" and isinstance(d, list):
            out += [(list(x), 4) for x in d if isinstance(x, list)]
        elif t in DTYPE_BYTES and isinstance(d, list) and all(isinstance(x, int) for x in d):
            out.append((list(d), DTYPE_BYTES[t]))
    return out


def _matmul_out(a: list[int], b: list[int]) -> tuple[float, list[int]]:
    """FLOPs and output shape of torch.matmul(a, b) with broadcasting and 1-D operands."""
    a2 = [1] + a if len(a) == 1 else a
    b2 = b + [1] if len(b) == 1 else b
    m, k, n = a2[-2], a2[-1], b2[-1]
    batch_a, batch_b = a2[:-2], b2[:-2]
    nb = max(len(batch_a), len(batch_b))
    batch_a = [1] * (nb - len(batch_a)) + batch_a
    batch_b = [1] * (nb - len(batch_b)) + batch_b
    batch = [max(x, y) for x, y in zip(batch_a, batch_b)]
    return 2.0 * _numel(batch) * m * k * n, batch + [m, n]


def op_work(name: str, input_dims: Sequence | None, input_types: Sequence[str] | None) -> OpWork:
    """FLOPs and bytes of an aten op from its profiler `Input Dims` / `Input type` args.

    Counting rules (forward ops; autograd backward nodes are parents of aten ops that the
    profiler records too, so they get 0 work here to avoid double counting):
      mm [M,K]x[K,N]: 2MKN; addmm adds MN; bmm/baddbmm per batch; matmul broadcasts;
      linear x[...,K] w[N,K]: 2·rows·K·N (+bias); _grouped_mm a[M,K] b[G,K,N]: 2MKN;
      scaled_dot_product_attention q[B,H,L,E] k[B,H,S,E] v[B,H,S,Ev]: 2BHLS(E+Ev) + 5BHLS
      (causal masks are ignored: the per-kind fit absorbs the constant factor);
      elementwise: 1 FLOP per output element; norms / softmax: 5 per element;
      movement: 0 FLOPs. Bytes: every tensor input read once + the output written once;
      views (is_view) move none.
    einsum's equation is not recorded, so it is composite (0 work; its bmm child counts).
    Fixed bytes: linear's weight and bias; a grouped GEMM's per-group weights (or the weight
    gradient it writes); addmm's bias and weight when its first input is a bias vector.
    Shapes alone cannot tell a plain mm's weight from an activation (a [2048, 2048] weight
    and 2,048 tokens of width 2,048 look alike): a backward node's fixed bytes come from its
    forward op instead (calibrate.attach_work, through the fwdbwd flows).
    """
    kind = classify(name)
    base = _aten_name(name)
    tensors = _tensors(input_dims or [], input_types or [])
    if not tensors or base[:1].isupper() or base == "einsum" or base in _VIEW_OPS:
        return OpWork(kind, 0.0, 0.0)
    item = tensors[0][1]
    in_bytes = float(sum(_numel(s) * it for s, it in tensors))
    shapes = [s for s, _ in tensors]
    flops = 0.0
    out_shape = max(shapes, key=_numel)
    try:
        if base in ("mm", "bmm", "matmul"):
            flops, out_shape = _matmul_out(shapes[0], shapes[1])
        elif base in ("addmm", "baddbmm", "addbmm", "_addmm_activation"):
            flops, out_shape = _matmul_out(shapes[1], shapes[2])
            flops += _numel(out_shape)
        elif base == "linear":
            x, w = shapes[0], shapes[1]
            out_shape = x[:-1] + [w[0]]
            flops = 2.0 * _numel(x[:-1]) * x[-1] * w[0] + (_numel(out_shape) if len(shapes) > 2 else 0)
        elif kind == "grouped_gemm":
            a, b = shapes[0], shapes[1]
            if len(a) == 2 and len(b) == 3:  # ragged rows, one weight per group
                out_shape = [a[0], b[2]]
                flops = 2.0 * a[0] * a[1] * b[2]
            elif len(a) == 3 and len(b) == 2:  # ragged K (weight gradient)
                out_shape = [a[0], a[1], b[1]]
                flops = 2.0 * a[1] * a[2] * b[1]
            else:
                flops, out_shape = _matmul_out(a, b)
        elif kind == "attention" and len(shapes) >= 3 and len(shapes[0]) >= 3:
            q, k, v = shapes[0], shapes[1], shapes[2]
            bh, l, e = _numel(q[:-2]), q[-2], q[-1]
            s, ev = k[-2], v[-1]
            out_shape = q[:-1] + [ev]
            flops = 2.0 * bh * l * s * (e + ev) + 5.0 * bh * l * s
            if "backward" in base:
                flops *= 2.5
        elif kind == "norm":
            flops = 5.0 * _numel(shapes[0])
            out_shape = shapes[0]
        elif kind == "elementwise":
            flops = float(_numel(out_shape))
            if base in ("mean", "sum"):
                out_shape = []  # reductions write little; the read dominates
        elif kind == "movement":
            if base in ("index", "index_select", "gather", "embedding") and len(shapes) > 1:
                out_shape = shapes[-1][:1] + shapes[0][1:] if base != "gather" else shapes[-1]
            elif base in ("cat", "stack"):
                out_shape = [sum(_numel(s) for s in shapes)]
    except IndexError:  # fewer tensor args than the op normally has: keep the byte count
        flops = 0.0
    out_bytes = _numel(out_shape) * item
    return OpWork(kind, float(flops), in_bytes + out_bytes, _fixed_bytes(base, kind, tensors, out_bytes))


def _fixed_bytes(base: str, kind: str, tensors: list, out_bytes: float) -> float:
    """op_work's fixed bytes (see there)."""
    def nbytes(t: tuple) -> float:
        return float(_numel(t[0]) * t[1])

    if base == "linear":
        return sum(nbytes(t) for t in tensors[1:3])
    if kind == "grouped_gemm" and len(tensors) >= 2:
        a, b = tensors[0][0], tensors[1][0]
        if len(a) == 2 and len(b) == 3:
            return nbytes(tensors[1])
        return float(out_bytes) if len(a) == 3 and len(b) == 2 else 0.0
    if base in ("addmm", "_addmm_activation") and len(tensors) >= 3 and len(tensors[0][0]) == 1:
        return nbytes(tensors[0]) + nbytes(tensors[2])
    return 0.0


# ---------------------------------------------------------------------------------------
# devices and the roofline fallback


@dataclass(frozen=True)
class DeviceSpec:
    """What the roofline needs of a device. Peak = dense, the dtype the workload uses."""

    name: str
    peak_flops_per_s: float
    mem_bytes_per_s: float
    launch_overhead_us: float


# Vendor datasheet figures (dense BF16 tensor-core FLOP/s, HBM bandwidth); launch overhead
# ≈ the CUDA kernel launch + scheduling gap seen in traces. The CPU entry is a placeholder
# for one AVX2/AVX-512 core; `calibrate` replaces it with measured figures.
DEVICES: dict[str, DeviceSpec] = {
    "A100-SXM-80GB": DeviceSpec("A100-SXM-80GB", 312e12, 2.039e12, 4.0),
    "H100-SXM": DeviceSpec("H100-SXM", 989e12, 3.35e12, 4.0),
    "H800": DeviceSpec("H800", 989e12, 3.35e12, 4.0),
    "H200": DeviceSpec("H200", 989e12, 4.8e12, 4.0),
    "B200": DeviceSpec("B200", 2250e12, 8.0e12, 4.0),
    "cpu-core": DeviceSpec("cpu-core", 50e9, 10e9, 5.0),
}

# Fraction of peak FLOP/s and of peak bytes/s an op kind reaches when never measured.
# GEMMs at LLM sizes reach 60-80% of tensor-core peak; grouped GEMMs with small per-expert
# batches less; fused attention ~50%; memory-bound kernels 60-85% of HBM bandwidth.
DEFAULT_EFFICIENCY: dict[str, tuple[float, float]] = {
    "gemm": (0.70, 0.80),
    "grouped_gemm": (0.55, 0.70),
    "attention": (0.50, 0.80),
    "elementwise": (1.00, 0.80),
    "norm": (1.00, 0.70),
    "movement": (1.00, 0.60),
    "other": (0.30, 0.50),
}


def roofline_us(kind: str, flops: float, nbytes: float, device: DeviceSpec) -> float:
    """launch overhead + max(flops / (eff·peak), bytes / (eff·bandwidth)), µs."""
    eff_f, eff_b = DEFAULT_EFFICIENCY.get(kind, DEFAULT_EFFICIENCY["other"])
    t_s = max(flops / (eff_f * device.peak_flops_per_s), nbytes / (eff_b * device.mem_bytes_per_s))
    return device.launch_overhead_us + t_s * 1e6


# ---------------------------------------------------------------------------------------
# fitted per-kind models


@dataclass
class KindFit:
    """A fitted duration model for one op kind (see module docstring for the forms)."""

    kind: str
    overhead_us: float
    us_per_mflop: float
    us_per_mb: float
    combine: Literal["sum", "max"] = "sum"
    n_points: int = 0
    median_abs_rel_err: float = 0.0

    def predict_us(self, flops: float | np.ndarray, nbytes: float | np.ndarray) -> np.ndarray | float:
        f = self.us_per_mflop * np.asarray(flops, dtype=float) / MFLOP
        b = self.us_per_mb * np.asarray(nbytes, dtype=float) / MB
        t = self.overhead_us + (f + b if self.combine == "sum" else np.maximum(f, b))
        return float(t) if np.ndim(t) == 0 else t

    @property
    def effective_gflops(self) -> float:
        """Asymptotic FLOP rate, GFLOP/s (inf if the fit found FLOPs free)."""
        return 1e3 / self.us_per_mflop if self.us_per_mflop > 0 else math.inf

    @property
    def effective_gbps(self) -> float:
        """Asymptotic memory rate, GB/s (inf if the fit found bytes free)."""
        return 1e3 / self.us_per_mb if self.us_per_mb > 0 else math.inf


def _nnls_weighted(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """min Σ (w·(Xc − y))² with c ≥ 0, exactly, by trying every active set (≤ 3 columns)."""
    ncol = x.shape[1]
    xw, yw = x * w[:, None], y * w
    best, best_loss = np.zeros(ncol), float(np.sum(yw**2))
    for r in range(1, ncol + 1):
        for cols in itertools.combinations(range(ncol), r):
            sol, *_ = np.linalg.lstsq(xw[:, cols], yw, rcond=None)
            if np.any(sol < 0):
                continue
            c = np.zeros(ncol)
            c[list(cols)] = sol
            loss = float(np.sum((xw @ c - yw) ** 2))
            if loss < best_loss - 1e-12 * max(best_loss, 1e-30):
                best, best_loss = c, loss
    return best, best_loss


def fit_kind(
    kind: str, flops: Sequence[float], nbytes: Sequence[float], dur_us: Sequence[float]
) -> KindFit:
    """Fit `KindFit` on measured points (≥ 3, durations > 0): both forms, keep the better.

    Minimises relative squared error with non-negative overhead and rates. The max form is
    fitted by alternating: assign each point to its bound (compute or memory) under the
    current coefficients, refit, repeat until the assignment is stable.
    """
    f = np.asarray(flops, dtype=float) / MFLOP
    b = np.asarray(nbytes, dtype=float) / MB
    y = np.asarray(dur_us, dtype=float)
    keep = y > 0
    f, b, y = f[keep], b[keep], y[keep]
    if len(y) < 3:
        raise SimulationError(f"cost model: kind {kind!r} has {len(y)} usable points, need ≥ 3")
    w = 1.0 / y
    ones = np.ones_like(y)
    c_sum, loss_sum = _nnls_weighted(np.column_stack([ones, f, b]), y, w)
    best = ("sum", c_sum, loss_sum)
    compute_bound = f * c_sum[1] >= b * c_sum[2]
    for _ in range(50):
        x = np.column_stack([ones, np.where(compute_bound, f, 0.0), np.where(compute_bound, 0.0, b)])
        c_max, _ = _nnls_weighted(x, y, w)
        new_bound = f * c_max[1] >= b * c_max[2]
        if np.array_equal(new_bound, compute_bound):
            break
        compute_bound = new_bound
    loss_max = float(np.sum((w * (c_max[0] + np.maximum(f * c_max[1], b * c_max[2]) - y)) ** 2))
    if loss_max < loss_sum * (1 - 1e-9):
        best = ("max", c_max, loss_max)
    combine, c, _ = best
    fit = KindFit(kind, float(c[0]), float(c[1]), float(c[2]), combine, int(len(y)))  # type: ignore[arg-type]
    rel = np.abs(np.asarray(fit.predict_us(f * MFLOP, b * MB)) - y) / y
    fit.median_abs_rel_err = float(np.median(rel))
    return fit


@dataclass
class CostModel:
    """Per-kind fits on one device, with the roofline for kinds never measured."""

    device: DeviceSpec
    fits: dict[str, KindFit] = field(default_factory=dict)

    def predict_us(self, kind: str, flops: float, nbytes: float) -> float:
        fit = self.fits.get(kind)
        if fit is not None:
            return float(fit.predict_us(flops, nbytes))
        return roofline_us(kind, flops, nbytes, self.device)

    def predict_op_us(self, name: str, flops: float, nbytes: float) -> float:
        """Duration of a named op: its own fit when one exists (keys like "aten::mm"), else
        its kind's fit, else the roofline."""
        fit = self.fits.get(name)
        if fit is not None:
            return float(fit.predict_us(flops, nbytes))
        return self.predict_us(classify(name), flops, nbytes)

    def overhead_us(self, name: str) -> float:
        """The fixed part of a named op's duration (its fit's, else the device launch cost)."""
        fit = self.fits.get(name) or self.fits.get(classify(name))
        return fit.overhead_us if fit is not None else self.device.launch_overhead_us

    def retarget(self, device: DeviceSpec) -> "CostModel":
        """The same efficiencies on another device: rates scale with its peaks."""
        f_ratio = self.device.peak_flops_per_s / device.peak_flops_per_s
        b_ratio = self.device.mem_bytes_per_s / device.mem_bytes_per_s
        o_ratio = device.launch_overhead_us / self.device.launch_overhead_us
        fits = {
            k: dataclasses.replace(
                v, overhead_us=v.overhead_us * o_ratio, us_per_mflop=v.us_per_mflop * f_ratio,
                us_per_mb=v.us_per_mb * b_ratio,
            )
            for k, v in self.fits.items()
        }
        return CostModel(device, fits)

    def to_json(self) -> dict:
        return {"device": dataclasses.asdict(self.device), "fits": {k: dataclasses.asdict(v) for k, v in self.fits.items()}}

    @classmethod
    def from_json(cls, obj: dict, source: str = "cost model") -> "CostModel":
        try:
            device = DeviceSpec(**obj["device"])
            fits = {k: KindFit(**v) for k, v in obj["fits"].items()}
        except (KeyError, TypeError) as err:
            raise SimulationError(f"{source}: bad compute cost model ({err})") from None
        return cls(device, fits)


def fit_cost_model(
    device: DeviceSpec, kinds: Sequence[str], flops: Sequence[float], nbytes: Sequence[float],
    dur_us: Sequence[float], min_points: int = 3,
) -> CostModel:
    """Fit one `KindFit` per kind that has ≥ min_points measured points."""
    kinds_a = np.asarray(kinds)
    f, b, y = (np.asarray(a, dtype=float) for a in (flops, nbytes, dur_us))
    fits = {}
    for kind in sorted(set(kinds_a.tolist())):
        sel = (kinds_a == kind) & (y > 0)
        if sel.sum() >= max(min_points, 3):
            fits[kind] = fit_kind(kind, f[sel], b[sel], y[sel])
    return CostModel(device, fits)


# ---------------------------------------------------------------------------------------
# communication


def wire_factor(coll: str, n: int) -> float:
    """Bytes each rank puts on the wire per byte of its input message (ring algorithms)."""
    if n <= 1:
        return 0.0
    return {
        "all_reduce": 2.0 * (n - 1) / n,
        "all_gather": float(n - 1),
        "reduce_scatter": (n - 1) / n,
        "all_to_all": (n - 1) / n,
        "broadcast": 1.0,
        "send": 1.0,
        "recv": 1.0,
        "barrier": 0.0,
    }.get(coll, 1.0)


def wire_bytes(coll: str, n: int, coll_bytes: float, splits: Sequence[float] = (), rank_in_group: int = -1) -> float:
    """Bytes a rank sends to other ranks; all-to-all-v counts its splits to the others."""
    if coll == "all_to_all" and len(splits) == n and 0 <= rank_in_group < n:
        return float(sum(splits) - splits[rank_in_group])
    return wire_factor(coll, n) * float(coll_bytes)


@dataclass
class CommFit:
    """alpha-beta for one collective at one group size: t = latency_us + wire / rate."""

    coll: str
    world_size: int
    latency_us: float
    us_per_mb: float
    n_points: int = 0
    median_abs_rel_err: float = 0.0

    def predict_us(self, wire: float | np.ndarray) -> float | np.ndarray:
        t = self.latency_us + self.us_per_mb * np.asarray(wire, dtype=float) / MB
        return float(t) if np.ndim(t) == 0 else t

    @property
    def bandwidth_gbps(self) -> float:
        """Algorithmic bandwidth, GB/s of wire bytes."""
        return 1e3 / self.us_per_mb if self.us_per_mb > 0 else math.inf


def fit_comm(coll: str, world_size: int, coll_bytes: Sequence[float], dur_us: Sequence[float]) -> CommFit:
    """Least-squares alpha-beta on microbenchmark points (message bytes per rank, µs)."""
    y = np.asarray(dur_us, dtype=float)
    if len(y) < 2 or np.any(~(y > 0)):
        raise SimulationError(f"comm model: {coll} at world size {world_size} needs ≥ 2 positive points")
    wire = wire_factor(coll, world_size) * np.asarray(coll_bytes, dtype=float) / MB
    c, _ = _nnls_weighted(np.column_stack([np.ones_like(y), wire]), y, 1.0 / y)
    fit = CommFit(coll, world_size, float(c[0]), float(c[1]), int(len(y)))
    fit.median_abs_rel_err = float(np.median(np.abs(np.asarray(fit.predict_us(wire * MB)) - y) / y))
    return fit


def _log_interp(points: list[tuple[float, float]], coll_bytes: float) -> float:
    """(payload bytes, value) points, piecewise-linear in log2(bytes), held beyond the outermost."""
    xs, ys = zip(*sorted(points))
    return float(np.interp(np.log2(max(coll_bytes, 1.0)), np.log2(xs), ys))


@dataclass
class CommModel:
    """Fitted collectives keyed by (coll, world size); falls back to the pooled link fit.
    load_exponent: how an in-flight transfer slows while its CPU ranks compute
    (simulator.engine's comm_load_exponent; from the calibration's comm_load);
    load_points: (payload bytes, exponent) per size of the calibration's load sweep, for
    load_exponent_at; core_use_points: (payload bytes, share of a core each rank's transfer
    takes from compute while in flight) per size, for core_use_at (none in calibrations
    before the sweep timed its compute loop); load_delay_points: (payload bytes, µs a
    loaded transfer waits for a core per runnable job beyond one per core: the sweep's
    median loaded − idle time over 1 / share − 1) per size, for load_delay_at;
    load_stall_points: (payload bytes, probability, µs) per size, for load_stall_at; load_model:
    which a replay uses, "exponent" (the default), "delay" or "stall"."""

    fits: dict[tuple[str, int], CommFit] = field(default_factory=dict)
    load_exponent: float = 1.0
    load_points: list[tuple[float, float]] = field(default_factory=list)
    core_use_points: list[tuple[float, float]] = field(default_factory=list)
    load_delay_points: list[tuple[float, float]] = field(default_factory=list)
    load_stall_points: list[tuple[float, float, float]] = field(default_factory=list)
    load_model: str = "exponent"

    def load_stall_at(self, coll_bytes: float) -> tuple[float, float]:
        """(probability, µs) that a transfer of `coll_bytes` issued while every core computes
        stalls, and its longest stall (simulator.engine comm_load_stall): each piecewise-linear
        in log2(bytes) through load_stall_points, held beyond the outermost; (0, 0) without."""
        if not self.load_stall_points:
            return 0.0, 0.0
        return (_log_interp([(b, p) for b, p, _ in self.load_stall_points], coll_bytes),
                _log_interp([(b, q) for b, _, q in self.load_stall_points], coll_bytes))

    def load_delay_at(self, coll_bytes: float) -> float | None:
        """How long a transfer of `coll_bytes` waits for a core, µs per runnable job beyond
        one per core (simulator.engine comm_load_delay_us): piecewise-linear in log2(bytes)
        through load_delay_points, held beyond the outermost; None without points (the
        engine then uses the load exponent)."""
        return _log_interp(self.load_delay_points, coll_bytes) if self.load_delay_points else None

    def core_use_at(self, coll_bytes: float) -> float:
        """The share of a core a transfer of `coll_bytes` takes from each of its ranks'
        compute while in flight: piecewise-linear in log2(bytes) through core_use_points,
        held beyond the outermost; 0 without points."""
        return _log_interp(self.core_use_points, coll_bytes) if self.core_use_points else 0.0

    def load_exponent_at(self, coll_bytes: float) -> float:
        """The load exponent of a transfer of `coll_bytes`: piecewise-linear in log2(bytes)
        through load_points, held beyond the outermost (a small payload loses more to a
        shared core than a large one: the wait for a core is a scheduler quantum, not a
        share of the transfer); load_exponent without points or bytes."""
        if not self.load_points or not coll_bytes > 0:
            return self.load_exponent
        return _log_interp(self.load_points, coll_bytes)

    def predict_us(self, coll: str, n: int, coll_bytes: float, splits: Sequence[float] = (), rank_in_group: int = -1) -> float:
        wire = wire_bytes(coll, n, coll_bytes, splits, rank_in_group)
        fit = self.fits.get((coll, n)) or self._nearest(coll, n)
        return float(fit.predict_us(wire))

    def _nearest(self, coll: str, n: int) -> CommFit:
        """Same collective at the closest fitted size, else any collective at that size."""
        same = [f for (c, _), f in self.fits.items() if c == coll]
        pool = same or [f for (_, m), f in self.fits.items() if m == n] or list(self.fits.values())
        if not pool:
            raise SimulationError(f"comm model: nothing calibrated to predict {coll} at world size {n}")
        return min(pool, key=lambda f: abs(f.world_size - n))

    def to_json(self) -> list[dict]:
        return [dataclasses.asdict(f) for f in self.fits.values()]

    @classmethod
    def from_json(cls, rows: list[dict], source: str = "comm model") -> "CommModel":
        try:
            fits = [CommFit(**r) for r in rows]
        except TypeError as err:
            raise SimulationError(f"{source}: bad comm model row ({err})") from None
        return cls({(f.coll, f.world_size): f for f in fits})
