"""GPU cost of a job: wall seconds on the GPU times an hourly price.

Default prices are approximate per-second serverless list prices (RunPod flex / Modal, late 2026)
expressed per hour; set GPU_PRICE_PER_HOUR to your own rate. Matched by substring of the name
torch reports, longest first, so "H100 NVL" does not fall to "H100".
"""

from __future__ import annotations

PRICE_PER_HOUR = {
    "B200": 6.84,
    "H200": 5.58,
    "H100 NVL": 4.47,
    "H100": 4.18,
    "A100-SXM4-80GB": 2.74,
    "A100 80GB": 2.74,
    "A100": 2.17,
    "L40S": 1.90,
    "L40": 1.58,
    "RTX 6000 Ada": 1.58,
    "L4": 0.68,
    "A10G": 1.10,
    "RTX 5090": 1.58,
    "RTX 4090": 1.10,
    "RTX A6000": 1.22,
    "cpu": 0.0,
}


def price_per_hour(gpu_name: str, override: float | None = None) -> float:
    """USD per hour for `gpu_name`: the override when given, else the table (0 when unknown)."""
    if override is not None:
        return override
    for key in sorted(PRICE_PER_HOUR, key=len, reverse=True):
        if key.lower() in gpu_name.lower():
            return PRICE_PER_HOUR[key]
    return 0.0


def job_cost(gpu_name: str, seconds: float, override: float | None = None) -> dict:
    """{"gpu", "gpu_seconds", "usd"} for a job that held the GPU `seconds`."""
    usd = seconds * price_per_hour(gpu_name, override) / 3600
    return {"gpu": gpu_name, "gpu_seconds": round(seconds, 3), "usd": round(usd, 6)}
