"""On a CUDA machine: the gpu codec's kernel times under tile-shape settings.

    . bench/device_setup.sh && python bench/gpu_codec_sweep.py

Encodes and decodes one FLUX.2-dev-sized carry (4608 x 6144 bf16) with each setting of
the tile kernels (DCT precision, channels per tile, channel blocks per program, warps)
and prints the device time of each kernel, from the profiler, as JSON lines.
"""

from __future__ import annotations

import itertools
import json

import torch

from comfy_mesh.codec import decode, get, gpu_kernels
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry
from gpu_codec_check import top_kernels  # this folder is on sys.path when run as a script


def kernel_times(fn) -> dict:
    return top_kernels(fn, n=40)


def main() -> None:
    spec = CorpusSpec(channels=6144)
    x = synthetic_carry(spec).to("cuda", torch.bfloat16)
    codec = get("gpu", rel_err=0.05, min_steps=256, graphs=False)  # a graph keeps the settings it was captured with
    for prec, cb, chunks, warps in itertools.product(("tf32x3", "tf32"), (32,), (1,), (4,)):
        gpu_kernels.PRECISION, gpu_kernels.CHANNEL_BLOCK, gpu_kernels.CHUNKS, gpu_kernels.NUM_WARPS = \
            prec, cb, chunks, warps
        msg = codec.encode(x, layout=spec.layout)
        y = decode(msg, "cuda").float()
        print(json.dumps({"prec": prec, "cb": cb, "chunks": chunks, "warps": warps,
                          "ratio": round(x.numel() * 2 / msg.nbytes, 3),
                          "rel_l2": round(float((y - x.float()).norm() / x.float().norm()), 5),
                          "encode": kernel_times(lambda: codec.encode(x, layout=spec.layout)),
                          "decode": kernel_times(lambda: decode(msg, "cuda"))}), flush=True)


if __name__ == "__main__":
    main()
