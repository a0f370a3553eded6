"""`python -m bench cost` (no GPU) and `python -m bench capped --tiny` (the capped bench's plumbing on
the tiny FLUX pipeline; on a CPU nothing caps memory, so its capped run forces offload-text)."""

from __future__ import annotations

import json

from bench import __main__ as bench_cli


def test_cost_names_a_plan_per_card_and_the_cheapest_class(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    assert bench_cli.main(["cost", "--out", str(tmp_path), "--markdown", str(tmp_path / "t.md")]) == 0
    res = json.loads((tmp_path / "cost.json").read_text())
    rows = {(r["family"], r["gpu"]): r for r in res["rows"]}
    assert rows[("flux", "RTX 4090")]["plan"] == "offload-text"  # 25.8 GiB resident > 23.5 free
    assert rows[("flux", "H200")]["seconds_are"] == "measured" and rows[("flux", "L40S")]["seconds_are"] == "estimate"
    assert rows[("flux", "A100 80GB")]["precision"] == "int8"
    for key, best in res["cheapest"].items():
        family, tier = key.split("/")
        priced = [r[f"usd_{tier}"] for r in res["rows"] if r["family"] == family and r.get(f"usd_{tier}")]
        assert best["usd"] == min(priced)
        assert f"cheapest for {family} ({tier} prices): **{best['gpu']}**" in (tmp_path / "t.md").read_text()
    assert res["prices_date"] and "ESTIMATE" in open(bench_cli.__file__.replace("__main__", "cost")).read()


def test_capped_tiny_runs_both_plans_through_service(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert bench_cli.main(["capped", "--tiny", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("capped_*.json")
    res = json.loads(path.read_text())
    assert res["uncapped"]["plan"]["memory"] == "resident" and res["capped"]["plan"]["memory"] == "offload-text"
    assert res["capped"]["cold_start"]["memory_plan"] == "offload-text"
    assert all(j["ok"] for j in res["uncapped"]["jobs"] + res["capped"]["jobs"])
    assert res["capped_over_uncapped"] > 0 and "rtx4090_estimate" not in res  # the estimate is a GPU figure
