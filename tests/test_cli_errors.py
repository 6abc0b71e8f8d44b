"""Bad input to any verb: one line on stderr naming what was wrong, exit code 2, no traceback."""

from __future__ import annotations

import pytest

from moesim.cli import main

MISSING = "/nonexistent-moesim-input"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["overlap", MISSING], MISSING),
        (["parse", MISSING, "-o", "{tmp}/run"], MISSING),
        (["simulate", "--trace", "{tmp}", "-o", "{tmp}/sim"], "ops.parquet"),
        (["cluster", "show", "nope"], "nope"),
        (["cluster", "show", MISSING + ".json"], "no such topology file"),
        (["model", "--preset", "nope"], "nope"),
        (["model", "--config", MISSING], f"{MISSING}: no such file"),
        (["model", "--config", "{tmp}/list.json"], "expected a JSON object"),
        (["dashboard", "{tmp}", "-o", "{tmp}/d.html"], "not a run dir"),
        (["profile", "--world-size", "0", "--out", "{tmp}/p"], "--world-size"),
        (["train", "--preset", "tiny", "--steps", "0", "--out", "{tmp}/t"], "--steps"),
        (["train", "--grow-from", "{tmp}/list.json", "--out", "{tmp}/t"], "not a moesim training checkpoint"),
        (["sweep", "--preset", "nope", "-o", "{tmp}/sw"], "nope"),
        (["cluster", "show", "{tmp}/list.json"], "not a readable topology"),
        (["simulate", "--preset", "small", "--gpus", "8", "--routing-record", "{tmp}/list.json", "-o", "{tmp}/s"],
         "expected a JSON object"),
        (["simulate", "--preset", "small", "--gpus", "8", "--routing-record", "{tmp}/empty.json", "-o", "{tmp}/s"],
         "no routing in it"),
        (["simulate", "--preset", "small", "--gpus", "8", "--routing-record", "{tmp}/log.csv", "-o", "{tmp}/s"],
         "must be numbers"),
        (["simulate", "--preset", "small", "--cluster", "cpu-loopback", "--gpus", "0", "-o", "{tmp}/s"], "gpus"),
        (["simulate", "--preset", "small", "--cluster", "h800", "--gpus", "12", "-o", "{tmp}/s"], "node size 8"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, expected, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "empty.json").write_text('{"preset": "small"}')
    (tmp_path / "log.csv").write_text("step,ffn_experts_per_token\n1,abc\n")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moesim {argv[0]}: ") and expected in lines[0]
    assert "Traceback" not in err and "[Errno" not in err
