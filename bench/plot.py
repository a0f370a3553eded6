"""Plots for the README: stock vs ours, per model."""

from __future__ import annotations


def plot_latency(res: dict, path: str) -> None:
    """Bars of end-to-end seconds (stock vs ours) per model, ratio annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("flux", "sdxl") if isinstance(res.get(m), dict) and "ours" in res[m]]
    if not models:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(models))
    stock = [res[m]["stock"]["e2e_s"] for m in models]
    ours = [res[m]["ours"]["e2e_s"] for m in models]
    ax.bar([i - 0.2 for i in x], stock, 0.4, label="stock diffusers (bf16)", color="#999")
    ax.bar([i + 0.2 for i in x], ours, 0.4, label="diffusion-worker recipe", color="#2a7")
    for i, m in enumerate(models):
        ax.text(i + 0.2, ours[i], f"{res[m]['ratio_e2e']}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x), [f"{m} {res.get('size', 1024)}², {res[m]['ours'].get('per_step_ms')} ms/step" for m in models])
    ax.set_ylabel("seconds per image (end to end)")
    ax.set_title(f"{res['versions']['gpu']}, random weights, batch 1", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
