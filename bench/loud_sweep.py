"""On a CUDA machine: the loud-token search (gpu_kernels.find_loud_fused) by block size
and warps, against torch's (gpu_layout.find_loud), on the corpus carry's token norms.

    . bench/device_setup.sh && python bench/loud_sweep.py

Prints one JSON object: microseconds a call (median of 200, CUDA events around one
launch: they include the launch's host time, so compare rows, not totals).
"""

from __future__ import annotations

import json

import torch

from centre_spread_sweep import gpu_ms  # this script's folder is on the path when it runs
from comfy_mesh.codec import gpu_kernels
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry
from comfy_mesh.codec.gpu_layout import Layout, find_loud


def _us(fn) -> float:
    return round(gpu_ms(fn, repeat=200) * 1e3, 1)


def main() -> int:
    spec = CorpusSpec()
    x = synthetic_carry(spec).cuda().float()[0]
    lay = spec.layout
    p = Layout(1, x.shape[0], x.shape[1], lay.n_txt, lay.h, lay.w, ())
    sq = ((x - x.median(0).values) ** 2).sum(1)
    want = find_loud(sq[p.n_txt:].contiguous(), p)
    report = {"gpu": torch.cuda.get_device_name(), "image_tokens": p.image_tokens,
              "torch_us": _us(lambda: find_loud(sq[p.n_txt:].contiguous(), p))}
    for block in (1024, 2048, 4096):
        for warps in (4, 8, 16):
            gpu_kernels.LOUD_BLOCK, gpu_kernels.LOUD_WARPS = block, warps
            got = gpu_kernels.find_loud_fused(sq, p)
            assert torch.equal(got[0], want[0]) and int(got[1]) == int(want[1])
            report[f"block_{block}_warps_{warps}_us"] = _us(lambda: gpu_kernels.find_loud_fused(sq, p))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
