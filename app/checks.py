"""The worker's side of preflight: turn settings and the resolved model source into preflight's plain
`Inputs`, run it, and turn a failure into WorkerBroken (the platform replaces the worker)."""

from __future__ import annotations

from dataclasses import replace

from app.config import Settings
from app.errors import WorkerBroken
from app.source import ModelSource
from app.storage import open_store
from preflight import Plan
from preflight.memory import MemoryPlanError, choose_memory_plan, table_for


def run_preflight(settings: Settings, source: ModelSource) -> Plan:
    """Run the preflight check (if enabled) and return its plan; a failed check breaks the worker."""
    import preflight

    if not settings.preflight:
        try:
            plan = preflight.detect_plan(settings.precision, settings.device)
            return _memory_without_preflight(settings, source, plan)
        except (preflight.PlanError, MemoryPlanError) as e:
            raise WorkerBroken(e.message, field=e.field) from None
    report = preflight.run(preflight_inputs(settings, source))
    if not report.ok:
        raise WorkerBroken(f"preflight failed: {report.failures()}")
    return report.plan


def _memory_without_preflight(settings: Settings, source: ModelSource, plan: Plan) -> Plan:
    """PREFLIGHT=0: the memory plan from the GPU's free memory as torch reports it (none on a CPU)."""
    free = None
    if plan.device == "cuda":
        import torch

        from preflight.gpu import GIB, usable_bytes

        free = usable_bytes(torch, *torch.cuda.mem_get_info(0)) / GIB
    table = table_for(source.family.memory_table(), plan.precision, settings.text_encoders)
    memory = choose_memory_plan(settings.memory_plan, free, table)
    return replace(plan, memory=memory.plan, vae_tiling=memory.vae_tiling, text_encoders=settings.text_encoders)


def preflight_inputs(settings: Settings, source: ModelSource):
    """The plain values preflight checks: device, precision, VRAM need, disk, and a store probe."""
    import preflight

    def storage() -> str:
        # Short timeouts and one retry: preflight must answer in seconds, the job path keeps its own retries.
        from app.storage import s3_client

        uri = settings.output_uri
        client = s3_client(connect_timeout=2, read_timeout=5, max_attempts=2) if uri.startswith("s3://") else None
        return open_store(uri, settings.presign_ttl_s, client=client).check()

    download = hub_cache = None
    if source.kind == "hub":
        from huggingface_hub import constants

        download = source.vram_gib.get("bf16")  # bf16 weights take about what they take in VRAM
        hub_cache = constants.HF_HUB_CACHE
    return preflight.Inputs(
        device=settings.device, precision=settings.precision, vram_gib=source.vram_gib,
        vram_source=f"{source.family.name} family estimate" if not source.tiny else "embedded tiny model",
        embedded=source.tiny, model_label=source.id, cache_dir=settings.cache_dir,
        download_gib=download, hub_cache=hub_cache, storage=storage, memory=source.family.memory_table(),
        memory_plan=settings.memory_plan, text_encoders=settings.text_encoders,
        storage_label=f"{settings.output_uri.split('://')[0] if '://' in settings.output_uri else 'local'} store")
