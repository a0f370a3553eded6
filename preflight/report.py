"""What a preflight run found: one `Check` per probe, gathered into a `Report` (table or JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field

from preflight.plan import Plan

OK, WARN, FAIL, SKIPPED = "ok", "warn", "fail", "skipped"


@dataclass
class Check:
    """One probe's verdict: `status` is ok | warn | fail | skipped, `detail` one line, `ms` its time."""

    id: str
    status: str
    detail: str
    ms: float = 0.0
    facts: dict = field(default_factory=dict)  # machine facts for the report's "gpu" section, not printed

    def to_dict(self) -> dict:
        """The `--json` form of one check."""
        return {"id": self.id, "status": self.status, "detail": self.detail, "ms": self.ms}


def ok(check_id: str, detail: str, **facts) -> Check:
    """A passed check; `facts` go to the report's "gpu" section."""
    return Check(check_id, OK, detail, facts=facts)


def warn(check_id: str, detail: str, **facts) -> Check:
    """A check that passed with a caveat worth reading; `facts` go to the report's "gpu" section."""
    return Check(check_id, WARN, detail, facts=facts)


def fail(check_id: str, detail: str, **facts) -> Check:
    """A check that stops the worker; `facts` go to the report's "gpu" section."""
    return Check(check_id, FAIL, detail, facts=facts)


def skipped(check_id: str, detail: str) -> Check:
    """A check not run here; `detail` says why (CPU mode, or an earlier failure it depends on)."""
    return Check(check_id, SKIPPED, detail)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, bounded: enough to name a cause, never a dump."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


@dataclass
class Report:
    """All checks of one run, the plan they decided and the machine facts they read."""

    checks: list[Check]
    plan: Plan
    requested_precision: str = "auto"
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings and skips do not stop the worker)."""
        return not any(c.status == FAIL for c in self.checks)

    def check(self, check_id: str) -> Check:
        """The check named `check_id` (KeyError if this run has none)."""
        for c in self.checks:
            if c.id == check_id:
                return c
        raise KeyError(check_id)

    def failures(self) -> str:
        """The failed checks as one line: `cuda: no CUDA device visible; storage: ...`."""
        return "; ".join(f"{c.id}: {c.detail}" for c in self.checks if c.status == FAIL)

    @property
    def gpu(self) -> dict:
        """Facts about the GPU and its software stack read by the checks (empty in CPU mode)."""
        facts: dict = {}
        for c in self.checks:
            facts.update(c.facts)
        return facts

    def to_dict(self) -> dict:
        """The `--json` shape: {"ok", "plan", "gpu", "checks", "elapsed_ms"}."""
        plan = self.plan.to_dict() | {"requested": self.requested_precision}
        return {"ok": self.ok, "plan": plan, "gpu": self.gpu, "checks": [c.to_dict() for c in self.checks],
                "elapsed_ms": self.elapsed_ms}

    def table(self) -> str:
        """A readable table: one row per check, then the verdict and the plan."""
        width = max(len(c.id) for c in self.checks)
        rows = [f"{'check':<{width}}  {'status':<7}  {'ms':>7}  detail"]
        rows += [f"{c.id:<{width}}  {c.status:<7}  {c.ms:>7.1f}  {c.detail}" for c in self.checks]
        counts = {s: sum(c.status == s for c in self.checks) for s in (FAIL, WARN)}
        verdict = "OK" if self.ok else "FAILED"
        p = self.plan
        where = f"{p.gpu_name} sm_{p.capability[0]}{p.capability[1]}" if p.capability else p.device
        rows.append(f"\npreflight {verdict}: {counts[FAIL]} failed, {counts[WARN]} warning(s), "
                    f"{self.elapsed_ms:.0f} ms; plan: {p.precision} on {where}; memory: {p.memory}"
                    + (" + VAE tiling" if p.vae_tiling else ""))
        return "\n".join(rows)
