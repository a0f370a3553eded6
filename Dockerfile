# The worker image. One image for RunPod (`CMD` runs the handler) and Modal
# (`modal.Image.from_dockerfile("Dockerfile")`, which ignores `CMD` and calls modal_app.py).
#
# Layers go from least to most often changed, so a code change rebuilds only the last few MB:
#   system packages -> torch + CUDA wheels -> other Python packages -> bake code -> weights -> app code
#
# No parser directive and no ARG above FROM: Modal then builds the FROM line as an image of its own
# and caches it across Dockerfile edits (modal/_utils/docker_utils.py, splittable_from_line_index).
#
# Why the CUDA *base* flavour (cudart only) and not -runtime or -cudnn-runtime: torch 2.11.0's wheel
# brings the whole CUDA 13.0.2 user space as pinned wheels (its metadata requires
# cuda-toolkit[cublas,cudart,cufft,...]==13.0.2 and nvidia-cudnn-cu13==9.19.0.56; see
# requirements/image-torch.txt) and loads those, not the system copies. A -cudnn-runtime base would
# add ~3 GB of a second cuBLAS/cuDNN that nothing loads, or worse, that LD_LIBRARY_PATH could make
# win over the versions torch was built against. libcuda.so comes from the host driver, mounted by
# the NVIDIA container runtime. What the base image still gives: NVIDIA_VISIBLE_DEVICES and
# NVIDIA_DRIVER_CAPABILITIES (so the runtime mounts the driver and nvidia-smi at all),
# NVIDIA_REQUIRE_CUDA (cuda>=13.0: the container runtime refuses a host driver too old for CUDA 13
# at container start, before preflight even runs) and cuda-compat (forward-compatible libcuda for
# data-center GPUs on older drivers). 13.0.2 is the exact CUDA release of torch's wheels.
# Pinned by tag only: no digest for this tag could be confirmed from a trustworthy source, and an
# invented digest is worse than none. Pin it yourself with the digest your registry reports
# (`docker buildx imagetools inspect nvidia/cuda:13.0.2-base-ubuntu24.04`).
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# The NVIDIA entrypoint prints a banner through bash before every start; Modal needs none either.
ENTRYPOINT []

# Ubuntu 24.04's CPython 3.12. gcc, libc6-dev and python3.12-dev are runtime needs, not build
# leftovers: Triton compiles its CUDA launcher (a small C extension including Python.h) on the first
# torch.compile in a fresh cache (triton/runtime/build.py), i.e. at warm-up on each new worker.
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A venv, so `python` (what Modal and our CMD call) is on PATH and pip does not fight Debian's
# externally-managed system Python. PYTHONPATH lets Modal's entrypoint (mounted under /root)
# import app/, preflight/ and weights/ from /app.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.12 -m venv /opt/venv

# Python packages from the hashed lock (requirements/lock.sh), torch's closure first in a layer of
# its own (~3 GB of wheels) so that bumping diffusers or transformers does not re-pull it.
# --no-deps: the lock is the whole set; --require-hashes: nothing outside it gets in.
# Source: PyPI. The torch==2.11.0 wheel on PyPI is the CUDA 13.0 build (its metadata, read when
# locking, requires cuda-toolkit==13.0.2); the same build is on https://download.pytorch.org/whl/cu130
# as 2.11.0+cu130, but one index keeps the lock hash-checkable and closed to dependency confusion.
COPY requirements/image-torch.txt /tmp/req/image-torch.txt
RUN pip install --no-deps --require-hashes --only-binary :all: -r /tmp/req/image-torch.txt
COPY requirements/image.txt /tmp/req/image.txt
RUN pip install --no-deps --require-hashes --only-binary :all: -r /tmp/req/image.txt \
 && pip check
# torchao only for INT8 (Ampere) images: diffusers imports it whenever it is installed, which cost
# 4-5 s of every cold start on H100 (bench/results/preflight_*.json) for a plan that never uses it.
ARG INT8=0
COPY requirements/image-int8.txt /tmp/req/image-int8.txt
RUN if [ "$INT8" = "1" ]; then \
      pip install --no-deps --require-hashes --only-binary :all: -r /tmp/req/image-int8.txt ; fi
# Import time (14-20 s for torch + diffusers + transformers without .pyc) is paid on every cold
# start, and a non-root worker cannot write .pyc into site-packages. pip's own .pyc are validated
# by source mtime, so any layer flattening that touches mtimes would silently void them; unchecked
# hash-based .pyc are valid as long as the file exists, which is right for an immutable layer.
# -f rewrites pip's timestamp .pyc. A few packages ship files that are not valid Python (templates,
# test data); pip tolerates those when it compiles, and so do we.
RUN python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash \
        "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null \
    || echo "compileall: some non-Python files in site-packages were skipped"

# Weights. `python -m weights bake` needs the weights/ package and the parts of app/ that resolve and
# read the model (family modules, job contract, model source, loading); only those are copied here,
# so a change to the service, storage, handler or preflight does not re-bake
# 17+ GB. If the bake starts importing another module, add it to this COPY: tests/test_container.py
# bakes the tiny model from exactly these files and fails until then.
WORKDIR /app
COPY weights/ /app/weights/
COPY app/__init__.py app/errors.py app/tiny.py app/schema.py app/limits.py app/source.py app/loading.py app/memory.py \
     /app/app/
COPY app/families/ /app/app/families/

# BAKE=1: `python -m weights bake` into /weights (what to bake: MODEL, REVISION, PRECISION).
# BAKE=0: an image without weights; /weights stays empty and is where a volume is mounted, or set
# MODEL / WEIGHTS_URI at deploy time (see the README's "The container").
# The Hugging Face token is a BuildKit secret (`--secret id=hf_token,...`): mounted for this one
# RUN, never in a layer or in `docker history`. Modal's builder passes build secrets as environment
# variables instead (`secrets=[...]` gives HF_TOKEN), which this RUN also accepts.
# The hub download cache goes to a temporary folder deleted in the same RUN: the layer holds the
# baked model only, not the raw checkpoint next to it (the build machine needs room for both).
# MODEL, REVISION and PRECISION are also the worker's runtime settings; a build argument is an
# environment variable of the RUN, so they are unset for the bake process after being expanded.
ARG BAKE=1
ARG MODEL=black-forest-labs/FLUX.1-dev
ARG REVISION=
ARG PRECISION=fp8
RUN --mount=type=secret,id=hf_token,required=false \
    set -eu; \
    if [ "$BAKE" = "1" ]; then \
        if [ -s /run/secrets/hf_token ]; then HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN; fi; \
        HF_HOME=/tmp/bake-hf env -u MODEL -u REVISION -u PRECISION \
            python -m weights bake --model "$MODEL" ${REVISION:+--revision "$REVISION"} \
                --out /weights --precision "$PRECISION"; \
        rm -rf /tmp/bake-hf; \
    elif [ "$BAKE" = "0" ]; then \
        mkdir -p /weights; \
    else \
        echo "BAKE must be 1 or 0, got '$BAKE'" >&2; exit 2; \
    fi

# Runtime settings, after the weights so that changing them does not re-bake. MODEL=/weights in
# both variants (a volume or a stream lands there for BAKE=0); HF_HUB_OFFLINE=1 because a worker
# must never reach for the hub at cold start. Caches live in one writable folder: HF, TorchInductor
# and Triton (point COMPILE_CACHE_URI at S3 to carry compiled graphs across workers). OUTPUT_URI's
# default is a folder the worker can write, for `docker run` smoke tests; deployments set s3://...
ENV MODEL=/weights \
    HF_HUB_OFFLINE=1 \
    OUTPUT_URI=/cache/outputs \
    CACHE_DIR=/cache \
    HF_HOME=/cache/hf \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TRITON_CACHE_DIR=/cache/triton

# A non-root user that can write the cache folder and nothing else: code, packages and weights stay
# root-owned and read-only to the worker. 10001 avoids Ubuntu 24.04's built-in `ubuntu` (1000).
# The cache folder is world-writable with the sticky bit, like /tmp, so a platform that runs the
# image under another UID still has a cache.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /cache --shell /usr/sbin/nologin worker \
 && install -d -m 1777 /cache

# The app code, last: editing it rebuilds only these small layers.
COPY app/ /app/app/
COPY preflight/ /app/preflight/
COPY handler.py /app/handler.py
# Our own .pyc are checked against the source hash: correct even if code is mounted over /app.
RUN python -m compileall -q -j 0 --invalidation-mode checked-hash /app/app /app/preflight /app/weights /app/handler.py

USER worker
# Preflight runs first, inside Service.load, before a weight is read.
CMD ["python", "-u", "handler.py"]
