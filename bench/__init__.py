"""Side-by-side benchmarks, run on a GPU: `python -m bench latency|coldstart|...`."""
