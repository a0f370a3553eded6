"""Which model this worker serves, resolved once at start from MODEL, WEIGHTS_URI and a baked manifest.

Results, preflight (VRAM, CPU mode), logs, the loader and the compile-cache key all read this one
answer. Kinds:
  tiny    MODEL=tiny-<family>: the family's embedded random model, built in code
  hub     a Hugging Face id (model_index.json read from the hub, or its cache when offline)
  folder  a local diffusers directory
  baked   a local directory written by `python -m weights bake|import` (it has a manifest.json)
  stream  WEIGHTS_URI=s3://bucket/prefix: a baked directory streamed from S3 (it wins over MODEL)
The family comes from the pipeline class in model_index.json or the manifest, never from a name;
a bake of an embedded tiny model is still tiny (its tiny defaults: 256x256 in 4 steps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from app.errors import WorkerBroken
from app.families import Family, family_for_pipeline_class, family_named, tiny_family
from weights import manifest as mf
from weights.errors import WeightsError


BAKED_DEFAULTS = ("steps", "guidance")  # the Defaults fields a baked manifest may set


@dataclass(frozen=True)
class ModelSource:
    kind: str  # tiny | hub | folder | baked | stream
    id: str  # the model's name as results report it: MODEL, or the source a bake recorded
    family: Family  # the tiny variant for an embedded model (or a bake of one)
    location: str | None = None  # the hub id, the folder, or the s3:// URI the weights are read from
    revision: str | None = None
    manifest: dict | None = None
    offline: bool = False  # hub: read only the local cache (HF_HUB_OFFLINE)

    @property
    def tiny(self) -> bool:
        return self.family.tiny

    @property
    def vram_gib(self) -> dict[str, float]:
        """GiB needed per precision: a bake's own figure for its precision, else the family estimate."""
        table = dict(self.family.vram_gib)
        if self.manifest and self.manifest.get("vram_gib") and not self.tiny:
            table[self.manifest["recipe"]["precision"]] = self.manifest["vram_gib"]
        return table

    def serving_family(self, denoiser_config) -> Family:
        """The family as the loaded weights serve it: its variant (read from the denoiser's config; the
        tiny one as built), then a bake's own defaults (`weights bake --steps/--guidance`, e.g. a fused
        4-step LoRA's), which win over the family's."""
        fam = self.family if self.tiny else self.family.variant(denoiser_config)
        baked = {k: v for k, v in ((self.manifest or {}).get("defaults") or {}).items() if k in BAKED_DEFAULTS}
        return replace(fam, defaults=replace(fam.defaults, **baked)) if baked else fam

    def cache_identity(self) -> str:
        """What the weights are, for the compiled-artifact key: kind, where they come from, revision."""
        return f"{self.kind}:{self.location or self.id}@{self.revision or ''}"

    def describe(self) -> str:
        where = f" from {self.location}" if self.location and self.location != self.id else ""
        return f"{self.id} ({self.family.name} family, {self.kind}{where})"


def resolve(model: str, revision: str | None = None, offline: bool = False, weights_uri: str | None = None,
            s3=None) -> ModelSource:
    """The ModelSource for these settings; WorkerBroken naming MODEL or WEIGHTS_URI when it cannot be served.

    `s3` makes the S3 client for WEIGHTS_URI (reading its manifest is the only network call here)."""
    if weights_uri:
        return _streamed(weights_uri, s3)
    fam = tiny_family(model)
    if fam is not None:
        return ModelSource("tiny", model, fam)
    path = Path(model).expanduser()
    if model.startswith(("/", ".", "~")) and not path.is_dir():  # a path, not a hub id (org/name)
        raise WorkerBroken(f"MODEL={model}: no such folder", field="MODEL")
    if path.is_dir():
        if (path / mf.NAME).is_file():
            return _baked(str(path), _manifest(lambda: mf.read(path), "MODEL"))
        return ModelSource("folder", model, _family_of_index(path / "model_index.json", model), str(path))
    return ModelSource("hub", model, _hub_family(model, revision, offline), model, revision, offline=offline)


def _from_manifest(manifest: dict, field: str) -> tuple[str, Family]:
    """(source id, family) a bake recorded, planned for the denoisers it holds (Wan 2.2's two experts);
    a bake of `tiny-<family>` serves the tiny variant."""
    source_id = manifest.get("source", {}).get("id") or "?"
    fam = family_named(manifest.get("family", "?"), field=field)
    tiny = tiny_family(source_id)
    if tiny is None:
        return source_id, fam.for_components({manifest.get("denoiser"), *manifest.get("extra_denoisers", ())})
    return source_id, tiny if tiny.name == fam.name else fam.tiny_variant()


def _baked(path: str, manifest: dict) -> ModelSource:
    source_id, fam = _from_manifest(manifest, "MODEL")
    return ModelSource("baked", source_id, fam, path, manifest.get("source", {}).get("revision"), manifest)


def _streamed(uri: str, s3) -> ModelSource:
    from app.storage import describe_s3_error, parse_s3_uri, s3_client
    from weights.stream import WORKERS, read_manifest

    bucket, prefix = parse_s3_uri(uri, field="WEIGHTS_URI")
    client = (s3 or (lambda: s3_client(max_pool_connections=WORKERS)))()
    manifest = _manifest(lambda: read_manifest(client, bucket, prefix, describe_s3_error), "WEIGHTS_URI")
    source_id, fam = _from_manifest(manifest, "WEIGHTS_URI")
    return ModelSource("stream", source_id, fam, uri, manifest.get("source", {}).get("revision"), manifest)


def _manifest(read, field: str) -> dict:
    try:
        return read()
    except WeightsError as e:
        raise WorkerBroken(f"{field}: {e.message}", field=field) from None


def _family_of_index(index: Path, model: str) -> Family:
    """The family of a model_index.json, planned for the components it holds (a null entry: absent)."""
    try:
        data = json.loads(index.read_text())
        class_name = data["_class_name"]
    except FileNotFoundError:
        raise WorkerBroken(f"MODEL={model} is a folder without model_index.json", field="MODEL") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise WorkerBroken(f"MODEL={model}: model_index.json is unreadable or has no _class_name",
                           field="MODEL") from None
    held = {k for k, v in data.items() if isinstance(v, list) and v and v[0] is not None}
    return family_for_pipeline_class(class_name).for_components(held)


def _hub_family(model: str, revision: str | None, offline: bool) -> Family:
    try:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(model, "model_index.json", revision=revision, local_files_only=offline)
    except Exception as e:  # not found, offline and not cached, gated...
        raise WorkerBroken(f"MODEL={model}: cannot read model_index.json ({type(e).__name__})", field="MODEL") from None
    return _family_of_index(Path(index), model)
