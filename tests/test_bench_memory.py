"""`python -m bench cost` (no GPU) and `python -m bench capped --tiny` (the capped bench's plumbing on
the tiny FLUX and Qwen-Image-Edit-Plus pipelines; on a CPU nothing caps memory, so its capped runs force
offload-text and offload-blocks)."""

from __future__ import annotations

import json

from bench import __main__ as bench_cli
from bench import capped as bench_capped


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


def test_capped_tiny_runs_every_section_through_service(tmp_path, monkeypatch):
    """FLUX resident vs offload-text, Qwen-Image-Edit-Plus resident vs offload-blocks (on a CPU nothing caps
    memory, so the capped plans are forced), the FP8 text encoders' error, INT8 vs bf16: all in one run."""
    monkeypatch.delenv("OUT", raising=False)
    assert bench_cli.main(["capped", "--tiny", "--steps", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("capped_*.json")
    res = json.loads(path.read_text())
    assert [k for k in res if k in bench_capped.SECTIONS] == ["flux", "qwen", "modfp8", "int8"]  # FLUX first
    flux, qwen = res["flux"], res["qwen"]
    assert flux["uncapped"]["plan"]["memory"] == "resident" and flux["capped"]["plan"]["memory"] == "offload-text"
    assert flux["capped"]["cold_start"]["memory_plan"] == "offload-text"
    assert qwen["uncapped"]["plan"]["memory"] == "resident" and qwen["capped"]["plan"]["memory"] == "offload-blocks"
    for r in (flux["uncapped"], flux["capped"], qwen["uncapped"], qwen["capped"]):
        assert r["jobs"] and all(j["ok"] for j in r["jobs"])
    for f in (flux, qwen):  # streamed text encoders / blocks: the resident plan's bytes, job by job
        assert [j["sha256"] for j in f["capped"]["jobs"]] == [j["sha256"] for j in f["uncapped"]["jobs"]]
    assert len({j["sha256"] for j in qwen["capped"]["jobs"]}) == 3  # and the jobs differ from each other
    assert [(j["steps"], j["guidance"]) for j in qwen["capped"]["jobs"]] == [(2, 1.0), (2, 4.0), (3, 4.0)]
    # a difference of two CPU timings: its sign is noise here, its presence is the plumbing
    assert isinstance(qwen["capped"]["cfg40_estimate_s"], float) and qwen["capped_over_uncapped"] > 0
    assert flux["capped_over_uncapped"] > 0 and "rtx4090_estimate" not in flux  # the estimate is a GPU figure
    assert all(flux["text_fp8"]["swapped_linears"].values()) and 0 < flux["text_fp8"]["latents_rel_err"] < 0.05
    assert res["int8"]["int8"]["quantized_linears"] > 0 and 0 < res["int8"]["int8"]["rel_err_vs_bf16"] < 0.05
    mod = res["modfp8"]
    assert mod["fp8_modulation_too"]["swapped"] > 0 and 0 < mod["fp8_modulation_too"]["rel_err_vs_fp8_recipe"] < 0.05
    assert mod["fp8_modulation_too"]["weights_bytes"] < mod["fp8_recipe"]["weights_bytes"] < mod["bf16"]["weights_bytes"]
    assert res["skipped"] == {}


def test_capped_budget_and_skip_leave_sections_out(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert bench_cli.main(["capped", "--tiny", "--skip", "flux,qwen,modfp8,int8", "--out", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("capped_*.json")).read_text())
    assert set(res["skipped"]) == set(bench_capped.SECTIONS) and "flux" not in res
