"""On a CUDA machine: time the gpu codec's centre-and-spread kernel for each (channels per
program, warps) and print the times (ms, median of 50) as JSON, to pick MEDIAN_CHANNELS
and MEDIAN_WARPS in codec/gpu_kernels.py.

    . bench/device_setup.sh && python bench/centre_spread_sweep.py --channels 6144
"""

from __future__ import annotations

import argparse
import json

import torch

from comfy_mesh.codec import gpu_kernels as K
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry


def gpu_ms(fn, repeat: int = 50) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=6144)
    args = p.parse_args()
    x = synthetic_carry(CorpusSpec(channels=args.channels)).to("cuda", torch.bfloat16)
    report = {"gpu": torch.cuda.get_device_name(), "shape": list(x.shape)}
    for cb in (1, 2, 4, 8, 16):
        for warps in (1, 2, 4, 8):
            K.MEDIAN_CHANNELS, K.MEDIAN_WARPS = cb, warps
            report[f"{cb}ch_{warps}w"] = round(gpu_ms(lambda: K._centre_and_spread(x, None)), 4)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
