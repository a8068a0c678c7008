#!/usr/bin/env bash
# Download the wheels the GPU bench machine lacks (it has torch, safetensors,
# huggingface_hub, numpy, but no pyzmq/zstandard/zeroconf/PyAV and no network) into .whl/.
# On the device: pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# PyNvVideoCodec (27 MB) is for bench/nvdec_check.py. PyAV is not in the default list: its
# wheel is 36 MB and .whl/ travels as a carried path (64 MiB in all); add it by hand
# (bench/device_wheels.sh av==18.1.0) only with room to spare, else carry pre-encoded
# streams (python bench/nvdec_check.py --write-streams .whl/nvdec_streams).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in "pyzmq==27.3.0" "zstandard==0.25.0" "psutil==7.2.2" "PyNvVideoCodec==2.2.4" "$@"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$spec"
done
ls -la .whl
