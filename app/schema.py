"""The public job contract: what a caller may send (JobInput) and what it gets back.

`parse_job(raw, family, defaults)` is the one door: it validates against the serving family's
limits and fills the family's defaults, or raises InvalidInput naming the first bad field.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator

from app.errors import InvalidInput
from app.limits import MAX_IMAGES, MAX_OUTPUT_BYTES, MAX_PROMPT_CHARS, MAX_STEPS, output_bytes_bound

Int = Annotated[int, Strict()]  # "512" or true are refused: JSON callers send numbers
Float = Annotated[float, Strict()]  # 3 and 3.5 pass; "3.5", true and b"3" are refused like for Int
MAX_SEED = 2**32 - 1
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class JobInput(BaseModel):
    """A text-to-image job. Sizes and defaults depend on the serving family (validation context)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    width: Int | None = None
    height: Int | None = None
    num_inference_steps: Int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: Float | None = Field(None, ge=0, le=30, allow_inf_nan=False)
    seed: Int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: Int = Field(1, ge=1, le=MAX_IMAGES)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: Int = Field(90, ge=1, le=100)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v, info: ValidationInfo):
        fam = (info.context or {}).get("family")
        if v and fam is not None and not fam.negative_prompt:
            raise ValueError(f"not supported by the {fam.name} family (guidance-distilled model)")
        return v

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v, info: ValidationInfo):
        fam = (info.context or {}).get("family")
        if v is None or fam is None:
            return v
        if v % 16:
            raise ValueError("must be a multiple of 16")
        if not fam.min_side <= v <= fam.max_side:
            raise ValueError(f"must be between {fam.min_side} and {fam.max_side}")
        width = info.data.get("width") if info.field_name == "height" else None
        if width and width * v > fam.max_pixels:
            raise ValueError(f"{width}x{v} is more than {fam.max_pixels} pixels")
        return v


class Job(BaseModel):
    """A validated job with every default resolved: what the pipeline runs."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int
    output_format: str
    output_quality: int
    max_sequence_length: int | None = None

    @property
    def seeds(self) -> list[int]:
        """One seed per image, so each image is reproducible on its own."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]


def parse_job(raw: Any, family, defaults) -> Job:
    """Validate a raw job input for `family`, filling `defaults`; raise InvalidInput on the first bad field."""
    if not isinstance(raw, dict):
        raise InvalidInput("the job input must be a JSON object", field="input")
    try:
        inp = JobInput.model_validate(raw, context={"family": family})
    except ValidationError as e:
        raise _invalid(e) from None
    width, height = inp.width or defaults.width, inp.height or defaults.height
    if output_bytes_bound(width, height, inp.num_images) > MAX_OUTPUT_BYTES:
        raise InvalidInput(f"num_images: {inp.num_images} x {width}x{height} may exceed the "
                           f"{MAX_OUTPUT_BYTES >> 20} MiB output limit", field="num_images")
    return Job(
        prompt=inp.prompt,
        negative_prompt=inp.negative_prompt,
        width=width,
        height=height,
        num_inference_steps=inp.num_inference_steps or defaults.steps,
        guidance_scale=defaults.guidance if inp.guidance_scale is None else inp.guidance_scale,
        seed=secrets.randbelow(MAX_SEED + 1) if inp.seed is None else inp.seed,
        num_images=inp.num_images,
        output_format=inp.output_format,
        output_quality=inp.output_quality,
        max_sequence_length=defaults.max_sequence_length,
    )


def _invalid(e: ValidationError) -> InvalidInput:
    err = e.errors(include_url=False, include_input=False)[0]
    field = _safe_field(".".join(str(p) for p in err["loc"])) or "input"
    if err["type"] == "extra_forbidden":
        return InvalidInput(f"{field}: unknown field", field=field)
    msg = err["msg"].removeprefix("Value error, ")
    return InvalidInput(f"{field}: {msg}", field=field)


def _safe_field(name: str) -> str:
    """A caller-chosen key as it may be echoed in an error (and a log line): printable, short.

    Unknown keys come from the caller; echoing them raw would let a caller write control
    characters or megabytes into our logs.
    """
    clean = "".join(c if c.isascii() and c.isprintable() else "?" for c in name[:64])
    return clean + ("..." if len(name) > 64 else "")


class ImageOut(BaseModel):
    url: str
    key: str
    width: int
    height: int
    seed: int
    content_type: str
    bytes: int


class Cost(BaseModel):
    gpu: str
    gpu_seconds: float
    usd: float


class JobResult(BaseModel):
    images: list[ImageOut]
    model: str
    timings: dict[str, float]
    cost: Cost
    cold_start: dict[str, float] | None = None


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class JobError(BaseModel):
    error: ErrorBody
