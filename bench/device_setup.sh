# Source this on the GPU bench machine, from the repo root:  . bench/device_setup.sh
# Installs the carried wheels (see bench/device_wheels.sh) and makes the repo importable
# as comfy_mesh without building it (the machine has no network for build deps).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/comfy_mesh
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
