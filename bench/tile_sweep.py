"""On a CUDA machine: the gpu codec's tile kernels (step fit, quantiser, inverse) for each
(channels per tile program, warps[, persistent programs per multiprocessor]), with the
ratio, as JSON: to pick CHANNEL_BLOCK, NUM_WARPS and PROGRAMS_PER_SM in
codec/gpu_kernels.py.

    . bench/device_setup.sh && python bench/tile_sweep.py --channels 6144 --configs 32x4x0 32x4x8
"""

from __future__ import annotations

import argparse
import json

import torch

from comfy_mesh.codec import get, gpu_kernels as K
from comfy_mesh.codec.base import StreamState
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry, synthetic_steps
from gpu_codec_profile import kernel_table  # this script's folder is on the path when it runs

KERNELS = ("_fit_kernel", "_quantise_kernel", "_inverse_kernel")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=6144)
    p.add_argument("--configs", nargs="+", default=["32x4", "32x2", "32x8", "16x2", "16x1", "64x4", "64x8"])
    args = p.parse_args()
    dev = torch.device("cuda")
    spec = CorpusSpec(channels=args.channels)
    x = synthetic_carry(spec).to(dev, torch.bfloat16)
    a, b = (t.to(dev, torch.bfloat16) for t in synthetic_steps(spec, rho=0.9, steps=2))
    report = {"gpu": torch.cuda.get_device_name()}
    for config in args.configs:
        values = [int(v) for v in config.split("x")]
        K.CHANNEL_BLOCK, K.NUM_WARPS = values[:2]
        if len(values) > 2:
            K.PROGRAMS_PER_SM = values[2]
        codec = get("gpu", rel_err=0.05, graphs=False)
        msg = codec.encode(x, layout=spec.layout)
        row = {"ratio": round(x.numel() * 2 / msg.nbytes, 4)}
        for side, fn in (("encode", lambda: codec.encode(x, layout=spec.layout)),
                         ("decode", lambda: codec.decode(msg, dev))):
            table = kernel_table(fn)
            row[side] = {k: v[1] for k, v in table["kernels"].items() if k in KERNELS}
        enc = StreamState()
        codec.encode(a, state=enc, layout=spec.layout)

        def delta():
            return codec.encode(b, state=enc.copy(), layout=spec.layout)

        row["delta"] = {k: v[1] for k, v in kernel_table(delta)["kernels"].items() if k in KERNELS}
        report[config] = row
        print(config, row, flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
