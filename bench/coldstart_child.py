"""The fresh process of `python -m bench coldstart` (kept separate so its imports are timed)."""

from bench.coldstart import child

child()
