"""`python -m bench cost`: USD per image of each family's default job on each GPU class (no GPU needed).

For every family and GPU class: the memory plan preflight would choose there (preflight.memory on the
card's free memory at start), the precision it would plan (preflight.plan.best_precision), seconds per
image and USD per image at two dated price lists; the cheapest class per family and list is named.

Seconds per image. The H200 row is measured: the worker's recipe end to end at 1024x1024 (FLUX.1-dev
shape 28 steps, SDXL shape 30 steps, random weights) from bench/results/latency_h200.json. Every other
row is an ESTIMATE scaled from it:

    t = t_H200 * (F * peak_H200 / peak_card + (1 - F) * bandwidth_H200 / bandwidth_card) + offload

F = 0.8: the share of a step bound by tensor-core throughput (assumed: at 1024x1024 both denoisers'
time is mostly GEMMs and attention; the rest is memory-bound elementwise work). `peak` is the dense
tensor throughput of the precision the card runs: FP8 with FP32 accumulation (what cuBLASLt's FP8
GEMM uses) on sm_89+, INT8 on A100 (INT8 dynamic through torchao; never measured on an A100). The H200
runs FA3 attention; other cards run cuDNN attention, which the formula does not model. `offload`:
an offload-text plan copies the text encoders host->device once per job, an offload-blocks plan the
denoiser once per step; at the card's PCIe rate (an estimate: pinned copies reach about 80% of the
link). Cold starts, queueing and RunPod's per-second rounding are not included.

Specs (dense, no sparsity): H200 SXM and H100 SXM FP8 1979 TFLOPS, 4.8 / 3.35 TB/s (NVIDIA H200 and
H100 datasheets); A100 80GB SXM INT8 624 TOPS, 2.04 TB/s (A100 datasheet); L40S FP8 733 TFLOPS, 864
GB/s (L40S datasheet, 1466 with sparsity); RTX 4090 FP8 with FP32 accumulate 330.3 TFLOPS (660.6 with
sparsity), 1008 GB/s (NVIDIA Ada Lovelace architecture whitepaper, appendix table); RTX 5090 FP8 with
FP32 accumulate 419 TFLOPS, 1792 GB/s (NVIDIA RTX Blackwell whitepaper figures as quoted in
main-horse.github.io/posts/5090-mm-perf, whose mmapeak measured 370). Memory: what torch reports as
total, less 0.5 GiB for the CUDA context (a 4090's 23.99 GiB leaves 23.5).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from app.cost import PRICES_DATE, SERVERLESS_PER_HOUR, COMMUNITY_PER_HOUR
from app.families import FAMILIES
from preflight.memory import MemoryPlanError, choose_memory_plan, table_for
from preflight.plan import best_precision

RESULTS = Path(__file__).resolve().parent / "results"
CONTEXT_GIB = 0.5  # the CUDA context and driver reservations, outside torch's free memory
COMPUTE_SHARE = 0.8  # F above
PCIE_EFFICIENCY = 0.8
GIB = 2**30


@dataclass(frozen=True)
class Card:
    name: str  # as the price lists and torch name it
    capability: tuple[int, int]
    total_gib: float
    tensor_tflops: dict  # precision -> dense TFLOPS (TOPS for int8)
    bandwidth_gbs: float
    pcie_gbs: float  # the link's one-way rate: Gen4 x16 32 GB/s, Gen5 x16 64 GB/s


CARDS = (
    Card("RTX 4090", (8, 9), 23.99, {"fp8": 330.3, "int8": 660.6, "bf16": 165.2}, 1008, 32),
    Card("L40S", (8, 9), 44.99, {"fp8": 733, "int8": 733, "bf16": 362}, 864, 32),
    Card("RTX 5090", (12, 0), 31.4, {"fp8": 419, "int8": 838, "bf16": 209.5}, 1792, 64),
    Card("A100 80GB", (8, 0), 79.2, {"int8": 624, "bf16": 312}, 2039, 32),
    Card("H100", (9, 0), 79.1, {"fp8": 1979, "int8": 1979, "bf16": 989}, 3350, 64),
    Card("H200", (9, 0), 139.8, {"fp8": 1979, "int8": 1979, "bf16": 989}, 4800, 64),
)
REFERENCE = "H200"


def measured(results: Path = RESULTS) -> dict:
    """family -> H200 figures of the worker's recipe (latency_h200.json): e2e seconds and steps."""
    data = json.loads((results / "latency_h200.json").read_text())
    out = {}
    for name in FAMILIES:
        r = data.get(name, {}).get("ours")
        if r and "e2e_s" in r:
            out[name] = {"e2e_s": r["e2e_s"], "per_step_ms": r["per_step_ms"], "peak_GiB": r.get("peak_GiB"),
                         "source": f"bench/results/latency_h200.json ({data['versions'].get('date')}, "
                                   f"commit {data['versions'].get('commit')})"}
    return out


def offload_s(plan: str, table: dict, steps: int, card: Card) -> float:
    """Host->device copy time a plan adds per image on `card` (see the module docstring)."""
    rate = card.pcie_gbs * PCIE_EFFICIENCY * 1e9 / GIB  # GiB/s
    if plan == "offload-text":
        return table["text_encoders"] / rate
    if plan == "offload-blocks":
        return (table["text_encoders"] + table["denoiser"] * steps) / rate
    return 0.0


def estimate(family, card: Card, base: dict, ref: Card) -> dict:
    """One row: the plan preflight would choose on `card` and its seconds and USD per image."""
    precision = best_precision(card.capability)
    free = round(card.total_gib - CONTEXT_GIB, 2)
    table = table_for(family.memory_table(), precision)
    row = {"family": family.name, "gpu": card.name, "precision": precision, "free_gib": free}
    try:
        mem = choose_memory_plan("auto", free, table)
    except MemoryPlanError as e:
        return row | {"plan": "does not fit", "why": e.message}
    row |= {"plan": mem.plan + (" + VAE tiling" if mem.vae_tiling else ""), "need_gib": mem.need_gib}
    steps = family.defaults.steps
    if card.name == ref.name and mem.plan == "resident":
        seconds, how = base["e2e_s"], "measured"
    else:
        ref_peak = ref.tensor_tflops["fp8"]  # the H200 figure is the FP8 recipe's
        scale = (COMPUTE_SHARE * ref_peak / card.tensor_tflops[precision]
                 + (1 - COMPUTE_SHARE) * ref.bandwidth_gbs / card.bandwidth_gbs)
        seconds, how = base["e2e_s"] * scale + offload_s(mem.plan, table, steps, card), "estimate"
    row |= {"seconds": round(seconds, 2), "seconds_are": how}
    for tier, prices in (("serverless", SERVERLESS_PER_HOUR), ("community", COMMUNITY_PER_HOUR)):
        hourly = prices.get(card.name)
        row[f"usd_{tier}"] = None if hourly is None else round(seconds * hourly / 3600, 6)
    return row


def run(results: Path = RESULTS) -> dict:
    base = measured(results)
    ref = next(c for c in CARDS if c.name == REFERENCE)
    rows = [estimate(FAMILIES[f], card, base[f], ref) for f in base for card in CARDS]
    cheapest = {}
    for f in base:
        for tier in ("serverless", "community"):
            priced = [r for r in rows if r["family"] == f and r.get(f"usd_{tier}") is not None]
            best = min(priced, key=lambda r: r[f"usd_{tier}"])
            cheapest[f"{f}/{tier}"] = {"gpu": best["gpu"], "usd": best[f"usd_{tier}"], "seconds": best["seconds"]}
    return {"prices_date": PRICES_DATE, "measured": base, "cards": [asdict(c) for c in CARDS], "rows": rows,
            "cheapest": cheapest, "method": __doc__.split("\n\n")[2].strip()}


def _usd(v) -> str:
    return "n/a" if v is None else f"{v * 1000:.2f}"


def markdown(res: dict, families=None, cards=None) -> str:
    """The table: one row per family and GPU class; USD per 1000 images; cheapest named below it."""
    lines = ["| family | GPU | precision | memory plan | s / image | USD / 1000 images serverless | "
             "USD / 1000 images community |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if (families and r["family"] not in families) or (cards and r["gpu"] not in cards):
            continue
        if "seconds" not in r:
            lines.append(f"| {r['family']} | {r['gpu']} | {r['precision']} | does not fit | - | - | - |")
            continue
        s = f"{r['seconds']:.2f}" + ("" if r["seconds_are"] == "measured" else " (est.)")
        lines.append(f"| {r['family']} | {r['gpu']} | {r['precision']} | {r['plan']} | {s} | "
                     f"{_usd(r['usd_serverless'])} | {_usd(r['usd_community'])} |")
    lines.append("")
    for key, c in res["cheapest"].items():
        if families and key.split("/")[0] not in families:
            continue
        family, tier = key.split("/")
        lines.append(f"- cheapest for {family} ({tier} prices): **{c['gpu']}**, "
                     f"{c['usd'] * 1000:.2f} USD per 1000 images ({c['seconds']:.2f} s each)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS), help="folder for cost.json (and $OUT when set)")
    ap.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    res = run()
    for folder in dict.fromkeys(filter(None, (args.out, os.environ.get("OUT")))):
        os.makedirs(folder, exist_ok=True)
        Path(folder, "cost.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)
    return 0
