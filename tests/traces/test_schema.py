import numpy as np
import pytest

from traces.errors import TraceError
from traces.schema import make_ops, read_ops, write_ops, write_ops_jsonl


def _columns(n=3):
    return {
        "id": np.arange(n),
        "rank": np.zeros(n, dtype=np.int32),
        "lane": ["cpu:main"] * n,
        "kind": ["compute", "comm", "compute"][:n],
        "name": [f"op{i}" for i in range(n)],
        "start_us": np.arange(n, dtype=float) * 10,
        "dur_us": np.full(n, 5.0),
        "deps": [[], [0], [0, 1]][:n],
    }


def test_round_trip_parquet_keeps_values_and_defaults(tmp_path):
    table = make_ops(_columns())
    path = write_ops(table, tmp_path / "ops.parquet")
    back = read_ops(path)
    assert back.column("deps").to_pylist() == [[], [0], [0, 1]]
    assert back.column("seq").to_pylist() == [-1, -1, -1]
    assert back.column("label").to_pylist() == ["", "", ""]
    write_ops_jsonl(back, tmp_path / "ops.jsonl")
    assert len((tmp_path / "ops.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dur_us": [1.0, -1.0, 2.0]}, "negative"),
        ({"kind": ["compute", "bogus", "comm"]}, "unknown kind"),
        ({"id": [0, 0, 1]}, "duplicate"),
        ({"coll": ["", "allreduce", ""]}, "unknown collective"),
    ],
)
def test_invalid_tables_are_rejected_with_the_reason(change, message):
    columns = _columns() | change
    with pytest.raises(TraceError, match=message):
        make_ops(columns)


def test_read_of_missing_file_says_which_command_makes_it(tmp_path):
    with pytest.raises(TraceError, match="moesim parse"):
        read_ops(tmp_path / "ops.parquet")
