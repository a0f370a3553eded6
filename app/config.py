"""Settings: read from the environment once, in an entrypoint, then passed down as arguments.

Nothing below `app/` reads `os.environ` itself; `Settings.from_env()` is the only place.
Every variable is listed, with its default and meaning, in the README's configuration table.
"""

from __future__ import annotations

import os
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.errors import WorkerBroken

# Variables whose values must never reach a log line or an error message.
SECRET_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "RUNPOD_API_KEY",
    "RUNPOD_AI_API_KEY",
    "MODAL_TOKEN_SECRET",
    "API_TOKEN",
)

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")  # loguru's own


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1024x1024,1344x768' -> [(1024, 1024), (1344, 768)] as (width, height)."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        w, _, h = part.lower().partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise ValueError(f"{part[:20]!r} is not WIDTHxHEIGHT (e.g. 1024x1024,1344x768)")
        shapes.append((int(w), int(h)))
    return shapes


class Settings(BaseModel):
    """The worker's whole configuration; defaults give the CPU demo on the embedded tiny model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "tiny-flux"
    revision: str | None = None
    hf_offline: bool = False
    output_uri: str = "./outputs"
    presign_ttl_s: int = Field(7 * 24 * 3600, ge=1, le=7 * 24 * 3600)
    gpu_price_per_hour: float | None = Field(None, ge=0)
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp8", "int8", "bf16"] = "auto"
    compile: Literal["regional", "full", "off"] = "regional"
    dynamic: Literal["off", "auto", "all"] = "auto"  # which shapes a compiled graph serves (app.optimize)
    attention: Literal["auto", "native", "cudnn", "flash", "fa3", "fa3_fp8"] = "auto"
    cuda_graphs: bool | None = None  # None: the model family decides (Family.cuda_graphs)
    memory_plan: Literal["auto", "resident", "offload-text", "offload-blocks"] = "auto"  # preflight.memory
    text_encoders: Literal["bf16", "fp8"] = "bf16"  # FP8Linear on the text encoders' repeated layers
    shapes: list[tuple[int, int]] | None = None
    compile_cache_uri: str | None = None
    weights_uri: str | None = None
    cache_dir: str = "/tmp/diffusion-worker"
    prefetch_weights: bool = True  # page a local MODEL folder's weights in while imports and preflight run
    job_timeout_s: float | None = Field(None, gt=0)  # None: the model family's default (Family.job_timeout_s)
    preflight: bool = True
    warmup: bool = True
    # app.text_cache: MiB of host memory for encoded prompts (a 512-token FLUX prompt is 4 MiB); 0: off
    text_cache_mb: int = Field(12288, ge=0)
    text_buckets: bool = False  # T5 at the smallest of 128/256/384/512 tokens holding the prompt
    step_cache: Literal["off", "fbcache", "taylorseer", "magcache"] = "off"  # a job's `cache` when it sends none
    loras: bool = False  # per-job LoRA: a zero low-rank branch beside every denoiser linear, built at start
    lora_max_rank: int = Field(64, ge=16, le=512)  # the branches' rank (x3 on fused QKV); a multiple of 16
    lora_cache: str | None = None  # LoRA files by content hash; None: CACHE_DIR/loras
    lora_cache_mb: int = Field(4096, ge=16)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        # Checked here so a typo names LOG_LEVEL instead of crashing later inside loguru.
        if v.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return v.upper()

    @field_validator("lora_max_rank")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v % 16:  # torch._scaled_mm runs the branch's FP8 GEMM on multiples of 16 only
            raise ValueError("must be a multiple of 16")
        return v

    @field_validator("shapes", mode="before")
    @classmethod
    def _shapes(cls, v):
        return parse_shapes(v) if isinstance(v, str) else v

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build Settings from environment variables (upper-case field names)."""
        env = os.environ if env is None else env
        raw = {}
        for name in cls.model_fields:
            value = env.get(name.upper())
            if value not in (None, ""):
                raw[name] = value
        # HF_HUB_OFFLINE is the hub's own variable; we honour it rather than invent one.
        if env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raw["hf_offline"] = True
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]).upper() if err["loc"] else "?"
            raise WorkerBroken(f"bad configuration {name}: {err['msg']}", field=name) from None


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of credential variables present in `env`, for log redaction (entrypoints only)."""
    env = os.environ if env is None else env
    return [env[v] for v in SECRET_VARS if len(env.get(v, "")) >= 4]
