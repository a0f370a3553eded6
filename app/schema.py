"""The public job contract: one model, `Job`, for what a caller sends and what the pipeline runs.

`parse_job(raw, family)` is the one door: validation reads the serving family from the validation
context, checks its limits and fills its defaults (size, steps, guidance, strength; a random seed),
so a validated Job has every field resolved but one: a job with input images that gives no size
gets it from its first image once the images are loaded (`Family.output_size`, then
`Job.with_size`). The first bad field raises InvalidInput naming it.

Input images (`image`, or `images` for a list) are references checked here by scheme and length
only; `app.inputs` fetches and decodes them under app.fetch's guards before any GPU work.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator, \
    model_validator

from app.errors import InvalidInput
from app.limits import MAX_FPS, MAX_FRAMES, MAX_IMAGES, MAX_INPUT_IMAGE_BYTES, MAX_INPUT_REF_CHARS, MAX_LORA_SCALE, \
    MAX_LORAS, MAX_OUTPUT_BYTES, MAX_PROMPT_CHARS, MAX_STEPS, output_bytes_bound, video_bytes_bound

Int = Annotated[int, Strict()]  # "512" or true are refused: JSON callers send numbers
Float = Annotated[float, Strict()]  # 3 and 3.5 pass; "3.5", true and b"3" are refused like for Int
MAX_SEED = 2**32 - 1
VIDEO_ONLY_FORMATS = ("mp4",)  # webp is both: a still, or animated from a video family
# Fields a caller may leave out (or send as null) that the family's defaults fill.
DEFAULTED = ("width", "height", "num_inference_steps", "guidance_scale", "seed", "strength", "output_format",
             "num_frames", "fps")
INPUT_SCHEMES = ("https", "http", "data", "s3")
DATA_URI_CHARS = len("data:image/webp;base64,") + (MAX_INPUT_IMAGE_BYTES + 2) // 3 * 4


def _image_ref(v: str) -> str:
    """An input image reference as far as it can be judged without fetching: scheme and length."""
    scheme = v.split(":", 1)[0].lower() if ":" in v else ""
    if scheme not in INPUT_SCHEMES:
        shown = _safe_field(scheme)[:16] + ":" if scheme else "(none)"
        raise ValueError(f"scheme {shown} not allowed (use https://, http://, data: or s3://)")
    if len(v) > (DATA_URI_CHARS if scheme == "data" else MAX_INPUT_REF_CHARS):
        what = f"over the {MAX_INPUT_IMAGE_BYTES} byte limit" if scheme == "data" else \
            f"longer than {MAX_INPUT_REF_CHARS} characters"
        raise ValueError(f"{'data: URI' if scheme == 'data' else 'URL'} is {what}")
    return v


ImageRef = Annotated[str, Strict(), AfterValidator(_image_ref)]
LORA_SCHEMES = ("https", "http", "s3")


def _lora_source(v: str) -> str:
    """A LoRA file's URL or s3:// object. A hub id would need the network at job time: refused."""
    scheme = v.split("://", 1)[0].lower() if "://" in v else ""
    if scheme not in LORA_SCHEMES:
        if not scheme and re.fullmatch(r"[\w.-]+/[\w.-]+(/.*)?", v):
            raise ValueError("hub ids are not fetched per job: give an https:// or s3:// URL of the "
                             ".safetensors file (e.g. https://huggingface.co/OWNER/NAME/resolve/REV/FILE)")
        shown = _safe_field(v.split(":", 1)[0])[:16] + ":" if ":" in v else "(none)"
        raise ValueError(f"scheme {shown} not allowed (use https://, http:// or s3://)")
    if len(v) > MAX_INPUT_REF_CHARS:
        raise ValueError(f"URL is longer than {MAX_INPUT_REF_CHARS} characters")
    return v


class LoraRef(BaseModel):
    """One LoRA of a job: its file and its weight; `sha256` pins the content (checked, and a cache hit
    without any fetch when the worker has that file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Annotated[str, Strict(), AfterValidator(_lora_source)]
    scale: Float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class Job(BaseModel):
    """A generation job: text-to-image, or with input images (image-to-image, edit) where the family
    takes them. Omitted sizes, steps, guidance and strength are the serving family's defaults; a job
    with input images and no size has width and height None until `with_size` resolves them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    width: Int | None
    height: Int | None
    num_inference_steps: Int = Field(ge=1, le=MAX_STEPS)
    guidance_scale: Float = Field(ge=0, le=30, allow_inf_nan=False)
    seed: Int = Field(ge=0, le=MAX_SEED)
    num_images: Int = Field(1, ge=1, le=MAX_IMAGES)
    output_format: Literal["png", "jpeg", "webp", "mp4"]  # the family's first format when left out
    output_quality: Int = Field(90, ge=1, le=100)
    image: ImageRef | None = None
    images: list[ImageRef] | None = Field(None, max_length=16)  # the family's own limit is checked below
    strength: Float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    num_frames: Int | None = Field(None, ge=1, le=MAX_FRAMES)  # video families only (their default filled)
    fps: Int | None = Field(None, ge=1, le=MAX_FPS)
    # opt-in step caching (app.step_cache); None: the worker's STEP_CACHE, "off" opts out of it
    cache: Literal["off", "fbcache", "taylorseer", "magcache"] | None = None
    loras: list[LoraRef] | None = Field(None, max_length=MAX_LORAS)  # the worker needs LORAS=1

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any, info: ValidationInfo):
        fam = _family(info)
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (k in DEFAULTED and v is None)}
        d = fam.defaults
        filled = dict(width=d.width, height=d.height, num_inference_steps=d.steps, guidance_scale=d.guidance,
                      seed=secrets.randbelow(MAX_SEED + 1), output_format=fam.output_formats[0])
        if fam.makes_video:
            filled.update(num_frames=d.frames, fps=d.fps)
        with_inputs = data.get("image") is not None or data.get("images") is not None
        if with_inputs:
            # the size follows the first input image unless the job gives it (both sides, checked below)
            filled.update(width=None, height=None)
            if fam.task(True) == "img2img":
                filled["strength"] = fam.default_strength
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
    def _side(cls, v: int | None, info: ValidationInfo):
        fam = _family(info)
        if v is None:
            return v
        if v % fam.multiple:
            raise ValueError(f"must be a multiple of {fam.multiple}")
        if not fam.min_side <= v <= fam.max_side:
            raise ValueError(f"must be between {fam.min_side} and {fam.max_side}")
        width = info.data.get("width") if info.field_name == "height" else None
        if width and width * v > fam.max_pixels:
            raise ValueError(f"{width}x{v} is more than {fam.max_pixels} pixels")
        return v

    @model_validator(mode="after")
    def _inputs(self, info: ValidationInfo):
        """Input images as the family takes them: how many, whether required, and what strength means."""
        fam = _family(info)
        if self.image is not None and self.images is not None:
            raise _FieldError("images", "give image (one) or images (a list), not both")
        if self.images is not None and not self.images:
            raise _FieldError("images", "must hold at least one image (or leave it out)")
        n, field = len(self.inputs), "image" if self.image is not None else "images"
        limit = fam.image_limit
        if n and not limit:
            raise _FieldError(field, f"the {fam.name} family takes no input image (text-to-image only)")
        if n > limit:
            raise _FieldError("images", f"at most {limit} input image{'s' * (limit > 1)} for the {fam.name} "
                                        f"family, got {n}")
        if fam.requires_image and not n:
            raise _FieldError("image", f"the {fam.name} family edits an input image: give image "
                                       f"(or images, up to {limit})")
        if n and (self.width is None) != (self.height is None):
            missing = "width" if self.width is None else "height"
            raise _FieldError(missing, "give width and height together, or neither (the size then follows "
                                       "the input image)")
        if self.strength is not None:
            if fam.task(bool(n)) != "img2img":
                why = "send an image" if fam.img2img_class else f"the {fam.name} family has no image-to-image task"
                raise _FieldError("strength", f"applies to image-to-image jobs only ({why})")
            if int(self.num_inference_steps * self.strength) < 1:
                raise _FieldError("strength", f"{self.strength:g} x {self.num_inference_steps} steps runs no "
                                              "denoising step; raise strength or num_inference_steps")
        return self

    @model_validator(mode="after")
    def _outputs(self, info: ValidationInfo):
        """Images or a video, as the family makes them: the format, and a video's frame count."""
        fam = _family(info)
        makes = "videos" if fam.makes_video else "images"
        if self.output_format not in fam.output_formats:
            kind = "a video" if self.output_format in VIDEO_ONLY_FORMATS else "an image"
            raise _FieldError("output_format", f"{self.output_format} is {kind} format; the {fam.name} family "
                                               f"makes {makes} ({', '.join(fam.output_formats)})")
        if not fam.makes_video:
            for name in ("num_frames", "fps"):
                if getattr(self, name) is not None:
                    raise _FieldError(name, f"the {fam.name} family makes images, not videos")
            return self
        n, k = self.num_frames, fam.frame_multiple
        if n % k != 1 or n < k + 1:
            lower = max(k + 1, n // k * k + 1)
            raise _FieldError("num_frames", f"must be {k}k+1 (the VAE packs {k} frames in one latent after the "
                                            f"first): e.g. {lower} or {lower + k}")
        if n > fam.max_frames:
            raise _FieldError("num_frames", f"at most {fam.max_frames} for the {fam.name} family, got {n}")
        if self.num_images != 1:
            raise _FieldError("num_images", f"the {fam.name} family makes one video per job")
        return self

    @model_validator(mode="after")
    def _output_bound(self):
        if self.width is not None and self.height is not None:
            _check_output_bound(self, self.width, self.height)
        return self

    @property
    def seeds(self) -> list[int]:
        """One seed per image, so each image is reproducible on its own."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    @property
    def inputs(self) -> tuple[str, ...]:
        """The input image references in job order (`image`, or the `images` list); () for a text job."""
        if self.image is not None:
            return (self.image,)
        return tuple(self.images or ())

    @property
    def input_fields(self) -> tuple[str, ...]:
        """Each input's field name as errors name it: `image`, or `images[0]`, `images[1]`..."""
        if self.image is not None:
            return ("image",)
        return tuple(f"images[{i}]" for i in range(len(self.images or ())))

    @property
    def size_from_input(self) -> bool:
        """True until `with_size` sets the size a job with input images left to its first image."""
        return self.width is None or self.height is None

    def with_size(self, width: int, height: int) -> "Job":
        """This job at the size its family resolved from the inputs (`Family.output_size`); InvalidInput
        naming num_images when the outputs at that size could exceed the output limit."""
        try:
            _check_output_bound(self, width, height)
        except _FieldError as e:
            raise InvalidInput(f"{e.field}: {e.message}", field=e.field) from None
        return self.model_copy(update={"width": width, "height": height})


def _check_output_bound(job: Job, width: int, height: int) -> None:
    """The job's outputs at this size cannot exceed MAX_OUTPUT_BYTES (a video: with its PNG poster)."""
    limit = f"the {MAX_OUTPUT_BYTES >> 20} MiB output limit"
    if job.num_frames is None:
        if output_bytes_bound(width, height, job.num_images) > MAX_OUTPUT_BYTES:
            raise _FieldError("num_images", f"{job.num_images} x {width}x{height} may exceed {limit}")
        return
    bound = video_bytes_bound(job.output_format, width, height, job.num_frames, job.fps)
    if bound + output_bytes_bound(width, height, 1) > MAX_OUTPUT_BYTES:
        raise _FieldError("num_frames", f"{job.num_frames} frames of {width}x{height} as {job.output_format} may "
                                        f"exceed {limit}; send fewer frames, a smaller size or mp4")


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
    field = _safe_field(_loc_name(err["loc"])) or "input"
    if err["type"] == "extra_forbidden":
        return InvalidInput(f"{field}: unknown field", field=field)
    msg = err["msg"].removeprefix("Value error, ")
    return InvalidInput(f"{field}: {msg}", field=field)


def _loc_name(loc) -> str:
    """("images", 1) -> "images[1]": a list item named as the caller wrote it."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


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


class PosterOut(BaseModel):
    url: str
    key: str
    content_type: str
    bytes: int


class VideoOut(BaseModel):
    url: str
    key: str
    width: int
    height: int
    frames: int
    fps: int
    duration_s: float
    seed: int
    content_type: str
    bytes: int
    poster: PosterOut


class Cost(BaseModel):
    gpu: str
    gpu_seconds: float
    usd: float


class LoraOut(BaseModel):
    sha256: str
    scale: float
    layers: int


class JobResult(BaseModel):
    images: list[ImageOut]
    videos: list[VideoOut] | None = None  # a video family's outputs (images is then empty)
    model: str
    timings: dict[str, float | str]  # phase ms; text_cache: hit | miss | off
    cost: Cost
    cold_start: dict[str, float | str] | None = None  # phase ms, and the memory plan's name
    loras: list[LoraOut] | None = None  # the LoRAs applied, job order (their content hash, not their URL)


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class JobError(BaseModel):
    error: ErrorBody
