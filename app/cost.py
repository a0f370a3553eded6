"""GPU cost of a job: wall seconds on the GPU times an hourly price.

The built-in prices are RunPod serverless flex per-second list prices (docs.runpod.io/serverless/pricing,
read on PRICES_DATE) expressed per hour; set GPU_PRICE_PER_HOUR to your own rate. Matched by substring
of the name torch reports, longest first, so "H100 NVL" does not fall to "H100". `python -m bench cost`
reads the same lists (and the community-cloud one) to price an image on each GPU class.
"""

from __future__ import annotations

PRICES_DATE = "2026-12-02"
# RunPod serverless flex, USD per second x 3600 (docs.runpod.io/serverless/pricing as read on PRICES_DATE).
# The RTX 5090 is not on that list: its figure is this table's earlier estimate, not a list price.
SERVERLESS_PER_HOUR = {
    "B200": 8.64,
    "H200": 5.58,
    "H100": 4.176,
    "A100 80GB": 2.736,
    "L40S": 1.908,
    "L40": 1.908,
    "RTX 6000 Ada": 1.908,
    "RTX A6000": 1.224,
    "A40": 1.224,
    "L4": 0.684,
    "RTX A5000": 0.684,
    "RTX 3090": 0.684,
    "RTX 4090": 1.116,
    "RTX 5090": 1.58,
    "RTX A4000": 0.576,
}
# RunPod community-cloud style per-hour pod prices (deploybase.ai/articles/runpod-gpu-pricing, its
# lowest column, "as of March 2026"): what a long-running worker on a rented pod pays.
COMMUNITY_PER_HOUR = {
    "B200": 5.98,
    "H200": 3.59,
    "H100": 2.69,  # SXM
    "A100 80GB": 1.39,  # SXM
    "L40S": 0.79,
    "L40": 0.69,
    "RTX 5090": 0.69,
    "RTX 4090": 0.34,
    "RTX 3090": 0.22,
    "L4": 0.44,
}
PRICE_PER_HOUR = {
    **SERVERLESS_PER_HOUR,
    "H100 NVL": 4.176,
    "A100-SXM4-80GB": 2.736,
    "A100": 2.736,  # RunPod's serverless A100 is the 80 GB one
    "A10G": 1.10,  # Modal's per-second price (an AWS card, not on RunPod)
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
