#!/usr/bin/env bash
# Re-lock the image's Python set. uv reads wheel metadata with HTTP range requests, so this runs
# on a CPU machine without downloading the multi-GB CUDA wheels. The lock is for the image's
# interpreter and platform (Ubuntu 24.04: CPython 3.12, glibc 2.39, x86_64), not for this machine.
set -euo pipefail
cd "$(dirname "$0")"
UV=${UV:-uv}
compile() {  # $1: input, $2: output
  "$UV" pip compile "$1" -o "$2" --generate-hashes --no-header --index-url https://pypi.org/simple \
    --python-version 3.12 --python-platform x86_64-manylinux_2_28 --only-binary :all: --quiet
}
# The torch closure alone, installed in its own layer so that bumping diffusers & co. does not
# re-download ~4 GB of CUDA wheels; tests/test_container.py checks both files agree.
printf -- '-c gpu.txt\ntorch\ntriton\n' > .image-torch.in
compile .image-torch.in image-torch.txt
compile image.in image.txt
rm -f .image-torch.in
