"""The public job contract: one model, `Job`, for what a caller sends and what the pipeline runs.

`parse_job(raw, family)` is the one door: validation reads the serving family from the validation
context, checks its limits and fills its defaults (size, steps, guidance; a random seed), so a
validated Job has every field resolved. The first bad field raises InvalidInput naming it.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator, \
    model_validator

from app.errors import InvalidInput
from app.limits import MAX_IMAGES, MAX_OUTPUT_BYTES, MAX_PROMPT_CHARS, MAX_STEPS, output_bytes_bound

Int = Annotated[int, Strict()]  # "512" or true are refused: JSON callers send numbers
Float = Annotated[float, Strict()]  # 3 and 3.5 pass; "3.5", true and b"3" are refused like for Int
MAX_SEED = 2**32 - 1
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Fields a caller may leave out (or send as null) that the family's defaults fill.
DEFAULTED = ("width", "height", "num_inference_steps", "guidance_scale", "seed")


class Job(BaseModel):
    """A text-to-image job. Omitted sizes, steps and guidance are the serving family's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    width: Int
    height: Int
    num_inference_steps: Int = Field(ge=1, le=MAX_STEPS)
    guidance_scale: Float = Field(ge=0, le=30, allow_inf_nan=False)
    seed: Int = Field(ge=0, le=MAX_SEED)
    num_images: Int = Field(1, ge=1, le=MAX_IMAGES)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: Int = Field(90, ge=1, le=100)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any, info: ValidationInfo):
        fam = _family(info)
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (k in DEFAULTED and v is None)}
        d = fam.defaults
        filled = dict(width=d.width, height=d.height, num_inference_steps=d.steps, guidance_scale=d.guidance,
                      seed=secrets.randbelow(MAX_SEED + 1))
        return {**filled, **data}

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v, info: ValidationInfo):
        fam = _family(info)
        if v and not fam.negative_prompt:
            raise ValueError(f"not supported by the {fam.name} family (guidance-distilled model)")
        return v

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int, info: ValidationInfo):
        fam = _family(info)
        if v % fam.multiple:
            raise ValueError(f"must be a multiple of {fam.multiple}")
        if not fam.min_side <= v <= fam.max_side:
            raise ValueError(f"must be between {fam.min_side} and {fam.max_side}")
        width = info.data.get("width") if info.field_name == "height" else None
        if width and width * v > fam.max_pixels:
            raise ValueError(f"{width}x{v} is more than {fam.max_pixels} pixels")
        return v

    @model_validator(mode="after")
    def _output_bound(self):
        if output_bytes_bound(self.width, self.height, self.num_images) > MAX_OUTPUT_BYTES:
            raise _FieldError("num_images", f"{self.num_images} x {self.width}x{self.height} may exceed the "
                                            f"{MAX_OUTPUT_BYTES >> 20} MiB output limit")
        return self

    @property
    def seeds(self) -> list[int]:
        """One seed per image, so each image is reproducible on its own."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]


class _FieldError(ValueError):
    """A whole-job check that still names the field the caller should change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _family(info: ValidationInfo):
    fam = (info.context or {}).get("family")
    if fam is None:
        raise RuntimeError("Job is validated with parse_job(raw, family): the family gives limits and defaults")
    return fam


def parse_job(raw: Any, family) -> Job:
    """Validate a raw job input for `family`, filling its defaults; raise InvalidInput on the first bad field."""
    if not isinstance(raw, dict):
        raise InvalidInput("the job input must be a JSON object", field="input")
    try:
        return Job.model_validate(raw, context={"family": family})
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(e: ValidationError) -> InvalidInput:
    err = e.errors(include_url=False, include_input=False)[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        return InvalidInput(f"{cause.field}: {cause.message}", field=cause.field)
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
    cold_start: dict[str, float | str] | None = None  # phase ms, and the memory plan's name


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class JobError(BaseModel):
    error: ErrorBody
