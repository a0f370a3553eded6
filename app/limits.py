"""Every bound on what a caller may make this worker do, in one place, each enforced before GPU work.

A public endpoint receives whatever its callers send. Each limit below is checked while the job is
validated (`app.schema.parse_job`) or while an input image is fetched (`app.fetch`), so a hostile or
careless input costs microseconds, never a GPU second. Per-family size limits (sides, pixels per
image) live with the family in `app.families` because they depend on the model.

| limit                    | value        | why                                                        |
|--------------------------|--------------|------------------------------------------------------------|
| MAX_PROMPT_CHARS         | 2,000 chars  | T5 reads 512 tokens; more text is ignored and costs tokenizing |
| MAX_STEPS                | 100          | quality saturates long before; bounds a job's GPU time     |
| MAX_IMAGES               | 4            | batch memory grows linearly; 4 x 2048^2 is the VRAM edge   |
| MAX_OUTPUT_BYTES         | 64 MiB       | worst case (4 x 2048^2 PNG of noise ~ 50 MiB) fits; bounds upload |
| MAX_FRAMES               | 257          | a video's frames (its family's own limit is lower: Wan 81) |
| MAX_FPS                  | 60           | a video's frame rate (playback only: frames are generated anyway) |
| MP4_BITS_PER_PIXEL       | 1.0          | H.264's rate cap (VBV): bounds an MP4 before any GPU work  |
| MAX_INPUT_IMAGE_BYTES    | 20 MiB       | an input image larger than this is not a photo             |
| MAX_INPUT_IMAGE_PIXELS   | 4096 x 4096  | decompression-bomb guard, checked from the header          |
| MAX_INPUT_REF_CHARS      | 8,192 chars  | an input image URL or s3:// key (data: URIs: the byte cap)  |
| MAX_LORAS                | 3            | LoRAs per job (their ranks share the branches' LORA_MAX_RANK) |
| MAX_LORA_BYTES           | 1 GiB        | one LoRA file (FLUX at rank 128 is about 1.3 GB in fp32, 650 MB in bf16) |
| MAX_LORA_SCALE           | 4            | a LoRA's scale, either sign; past it images are noise       |
| LORA_FETCH_DEADLINE_S    | 300 s        | one LoRA download, redirects included (cached after it)     |
| FETCH_CONNECT_TIMEOUT_S  | 5 s          | per connection                                             |
| FETCH_READ_TIMEOUT_S     | 10 s         | per read (a stalled server)                                |
| FETCH_DEADLINE_S         | 30 s         | whole fetch, redirects included (a slow drip)              |
| FETCH_MAX_REDIRECTS      | 3            |                                                            |
| WEBHOOK_DEADLINE_S       | 10 s         | one webhook call, connect to answer (3 tries, 1 s + 2 s apart) |
| MAX_RUN_BODY_BYTES       | 10 MB        | a jobs API request body (RunPod's own limit for /run)       |
| MAX_RUNSYNC_BODY_BYTES   | 20 MB        | the same for /runsync (RunPod's limit)                      |
"""

from __future__ import annotations

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 100
MAX_IMAGES = 4
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
MAX_FRAMES = 257
MAX_FPS = 60
# The H.264 encoder's VBV cap (app.video): maxrate = this x width x height x fps, a buffer of
# MP4_BUFFER_S seconds at that rate. Visually lossless output of a generated clip needs ~0.1-0.3 bits per
# pixel; the cap only bites on noise, where it keeps the file bounded by rate x duration.
MP4_BITS_PER_PIXEL = 1.0
MP4_BUFFER_S = 2.0
MP4_OVERHEAD_BYTES = 64 * 1024  # container boxes (~20 bytes a frame) and x264's header SEI
# Animated WEBP (lossy, app.video): a frame of noise at quality 100 measured 37% of its raw RGB; allow 50%.
WEBP_RAW_SHARE = 0.5

MAX_INPUT_IMAGE_BYTES = 20 * 1024 * 1024
MAX_INPUT_IMAGE_PIXELS = 4096 * 4096
INPUT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_INPUT_REF_CHARS = 8192

MAX_LORAS = 3
MAX_LORA_BYTES = 1 << 30
MAX_LORA_SCALE = 4.0
LORA_FETCH_DEADLINE_S = 300.0

FETCH_CONNECT_TIMEOUT_S = 5.0
FETCH_READ_TIMEOUT_S = 10.0
FETCH_DEADLINE_S = 30.0
FETCH_MAX_REDIRECTS = 3

WEBHOOK_CONNECT_TIMEOUT_S = 5.0
WEBHOOK_DEADLINE_S = 10.0
WEBHOOK_ATTEMPTS = 3

MAX_RUN_BODY_BYTES = 10 * 1000 * 1000
MAX_RUNSYNC_BODY_BYTES = 20 * 1000 * 1000


def output_bytes_bound(width: int, height: int, num_images: int) -> int:
    """An upper bound on the encoded size of a job's outputs, known before any GPU work.

    PNG of incompressible pixels is the worst of our formats: 3 bytes per pixel and one filter
    byte per row, plus deflate and chunk framing (measured: 0.02% on 512x512 noise; we allow 1%
    and 4 KiB). JPEG and WEBP at quality 100 stay well below it (66% and 37% of raw on noise).
    """
    raw = height * (width * 3 + 1)
    return num_images * (raw + raw // 100 + 4096)


def video_bytes_bound(fmt: str, width: int, height: int, frames: int, fps: int) -> int:
    """An upper bound on one encoded video's size (its poster not included), known before any GPU work.

    MP4: the encoder's rate cap over the clip plus one full buffer and the container; WEBP: each frame
    at WEBP_RAW_SHARE of its raw RGB plus 4 KiB of frame header.
    """
    if fmt == "mp4":
        rate = MP4_BITS_PER_PIXEL * width * height * fps  # bits per second
        return int((rate * frames / fps + rate * MP4_BUFFER_S) / 8) + MP4_OVERHEAD_BYTES
    return frames * (int(width * height * 3 * WEBP_RAW_SHARE) + 4096) + 4096
