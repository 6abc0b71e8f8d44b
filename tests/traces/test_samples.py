"""The committed live samples (traces/samples, 2 gloo ranks, tiny LongCat-Flash): the
shortcut schedule hides communication, the sequential one (every exchange waited for at
once) hides none — and the parsed labels are the model's L{layer}/{block} names."""

from pathlib import Path

import pytest

from traces.kineto import parse_traces
from traces.overlap import compute_metrics
from traces.rundir import trace_files

SAMPLES = Path(__file__).resolve().parents[2] / "traces" / "samples"


def _metrics(schedule):
    run = SAMPLES / f"tiny-prefill-{schedule}"
    if not run.is_dir():
        pytest.skip(f"{run} absent")
    return parse_traces(trace_files(run))


def test_shortcut_hides_more_comm_than_sequential():
    seq, sbo = compute_metrics(_metrics("sequential")), compute_metrics(_metrics("shortcut"))
    assert seq["overlap_pct_mean"] < 2  # an exchange waited for at once overlaps nothing
    assert sbo["overlap_pct_mean"] > seq["overlap_pct_mean"] + 5
    hidden = {name: sum(r["hidden_comm_us"] for r in m["ranks"].values()) for name, m in (("seq", seq), ("sbo", sbo))}
    assert hidden["sbo"] > 10 * max(hidden["seq"], 1.0)
    windows = {row["label"]: row["window_us"] for row in sbo["labels"]}
    assert windows["L0/dispatch"] > 0 and windows["L0/combine"] > 0


def test_sample_ops_carry_model_labels_and_collectives():
    ops = _metrics("shortcut").to_pylist()
    comm = [o for o in ops if o["kind"] == "comm"]
    assert comm and all(o["lane"].startswith("cpu:gloo") for o in comm)
    labelled = {o["label"] for o in comm if o["coll"] == "all_to_all"}
    assert {"L0/dispatch", "L0/combine"} <= labelled
    blocks = {o["label"].split("/", 1)[1] for o in ops if o["label"].startswith("L0/")}
    assert {"attn0", "router", "dispatch", "mlp0", "attn1", "experts", "combine", "mlp1"} <= blocks
    assert all(o["deps"] for o in comm if o["label"])  # each issued collective depends on its issue call
