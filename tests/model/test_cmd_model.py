"""`moesim model`: the size table, its JSON form, and bad input as one line + exit 2."""

from __future__ import annotations

import json

from model import LongcatConfig
from moesim.cli import main


def test_json_size_table_for_longcat_flash(capsys):
    assert main(["model", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert round(row["total_params"] / 1e9, 1) == 560.7
    assert round(row["activated_params_min"] / 1e9, 1) == 18.7
    assert row["ffn_experts_per_token_mean"] == 8.0  # 12 x 512 / 768
    assert round(row["activated_params_max"] / 1e9, 1) == 31.4
    assert row["kv_cache_bytes_per_token"] == 64_512
    assert row["decode_flops_per_token"] > 2 * row["activated_params_mean"]  # matmuls + attention


def test_table_from_a_config_file(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    LongcatConfig.preset("small", zero_expert_num=0, moe_topk=8).to_json(path)
    assert main(["model", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "64 FFN + 0 zero experts, top-8" in out and "total params" in out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["model", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huge" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**LongcatConfig.preset("tiny").to_dict(), "moe_topk": 99}))
    assert main(["model", "--config", str(bad)]) == 2
    assert "moe_topk" in capsys.readouterr().err
    assert main(["model", "--config", str(tmp_path / "missing.json")]) == 2


def test_table_shows_small_models_in_readable_units(capsys):
    """tiny has ~0.4 M parameters: the table prints the count of the built model's weights
    (identity experts own none), not "0.000 B"."""
    from model.longcat import LongcatFlash

    cfg = LongcatConfig.preset("tiny")
    built = sum(p.numel() for p in LongcatFlash(cfg).parameters())
    assert main(["model", "--preset", "tiny"]) == 0
    total_line = next(line for line in capsys.readouterr().out.splitlines() if "total params" in line)
    assert total_line.split()[-1] == f"{built:,}"
