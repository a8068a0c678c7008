"""On a CUDA machine: rANS kernel time and ratio by lanes per group, lanes per warp and steps.

    . bench/device_setup.sh && python bench/rans_lanes_sweep.py

One FLUX.2-dev-sized carry (4608 x 6144 bf16) at rel_err 0.05, launched path; prints one
JSON line per setting with the encode and decode kernel times from the profiler.
"""

import json

import torch

from comfy_mesh.codec import decode, entropy_triton as T, get
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry
from gpu_codec_check import top_kernels  # this folder is on sys.path when run as a script
spec = CorpusSpec(channels=6144)
x = synthetic_carry(spec).to("cuda", torch.bfloat16)
# (lanes per group, lanes per warp, steps per lane): the first is the default
for lanes, per_warp, steps in ((32, 32, 256), (64, 64, 128), (64, 64, 256), (64, 32, 128), (128, 128, 64)):
    T.LANES_PER_WARP = per_warp
    c = get("gpu", rel_err=0.05, lanes=lanes, min_steps=steps, graphs=False)
    m = c.encode(x, layout=spec.layout)
    y = decode(m, "cuda")
    e = top_kernels(lambda: c.encode(x, layout=spec.layout), 30).get("_encode_kernel")
    d = top_kernels(lambda: decode(m, "cuda"), 30).get("_decode_kernel")
    print(json.dumps({"lanes": lanes, "per_warp": per_warp, "steps": steps, "ratio": round(x.numel() * 2 / m.nbytes, 3),
                      "rel": round(float((y.float() - x.float()).norm() / x.float().norm()), 5), "enc_ms": e,
                      "dec_ms": d}), flush=True)
