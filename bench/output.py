"""Where benchmark results go: `<stem>_<gpu>.json` in bench/results (or a given folder) and $OUT."""

from __future__ import annotations

import json
import os


def gpu_slug(res: dict) -> str:
    return res["versions"]["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()


def folders(out_dir: str = "bench/results") -> list[str]:
    """`out_dir` and $OUT (when set), each once, created."""
    out = list(dict.fromkeys(filter(None, (out_dir, os.environ.get("OUT")))))
    for folder in out:
        os.makedirs(folder, exist_ok=True)
    return out


def save_json(res: dict, stem: str, out_dir: str = "bench/results") -> list[str]:
    """Write `res` as `<stem>_<gpu>.json` into each folder; print a short summary; the paths written."""
    written = []
    for folder in folders(out_dir):
        path = os.path.join(folder, f"{stem}_{gpu_slug(res)}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        written.append(path)
    print(json.dumps({k: v for k, v in res.items() if k != "versions"})[:3000], flush=True)
    return written
