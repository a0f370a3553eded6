"""The worker's side of preflight: turn settings and the resolved model source into preflight's plain
`Inputs`, run it, and turn a failure into WorkerBroken (the platform replaces the worker)."""

from __future__ import annotations

from app.config import Settings
from app.errors import WorkerBroken
from app.source import ModelSource
from app.storage import open_store
from preflight import Plan


def run_preflight(settings: Settings, source: ModelSource) -> Plan:
    """Run the preflight check (if enabled) and return its plan; a failed check breaks the worker."""
    import preflight

    if not settings.preflight:
        try:
            return preflight.detect_plan(settings.precision, settings.device)
        except preflight.PlanError as e:
            raise WorkerBroken(e.message, field=e.field) from None
    report = preflight.run(preflight_inputs(settings, source))
    if not report.ok:
        raise WorkerBroken(f"preflight failed: {report.failures()}")
    return report.plan


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
        download_gib=download, hub_cache=hub_cache, storage=storage,
        storage_label=f"{settings.output_uri.split('://')[0] if '://' in settings.output_uri else 'local'} store")
