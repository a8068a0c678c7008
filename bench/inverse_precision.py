"""On a CUDA machine: the decoder's inverse transform at each tensor-core precision
(gpu_kernels.INVERSE_PRECISION): its kernel time and what it adds to a decode's error.

    . bench/device_setup.sh && python bench/inverse_precision.py --channels 6144

For a key and a delta message of the corpus (temporal pair, rho 0.9): the inverse
kernel's GPU time, the decode's rel_l2 against the carry, and its rel_l2 against the
tf32x3 decode. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch

from comfy_mesh.codec import get, gpu_graphs, gpu_kernels
from comfy_mesh.codec.base import StreamState
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_steps
from gpu_codec_profile import kernel_table  # this script's folder is on the path when it runs


def rel(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y.float() - x.float()).norm() / x.float().norm())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=6144)
    p.add_argument("--rel-err", type=float, default=0.03)
    args = p.parse_args()
    dev = torch.device("cuda")
    spec = CorpusSpec(channels=args.channels)
    a, b = (t.to(dev, torch.bfloat16) for t in synthetic_steps(spec, rho=0.9, steps=2))
    codec = get("gpu", rel_err=args.rel_err)
    sent = StreamState()
    key = codec.encode(a, state=sent, layout=spec.layout)
    delta = codec.encode(b, state=sent, layout=spec.layout)
    report, exact = {"gpu": torch.cuda.get_device_name()}, {}
    received = StreamState()
    codec.decode(key, dev, state=received)  # the state a delta decode starts from
    for precision in ("tf32x3", "tf32", "ieee"):
        gpu_kernels.INVERSE_PRECISION = precision
        gpu_graphs._DECODE_GRAPHS.clear()  # (captured with the old constant)
        row = {}
        for name, msg, x in (("key", key, a), ("delta", delta, b)):
            def call():
                return codec.decode(msg, dev, state=StreamState() if msg is key else received.copy())
            y = call()
            exact.setdefault(name, y)
            inverse = [v[1] for k, v in kernel_table(call)["kernels"].items() if "_inverse_kernel" in k]
            row[name] = {"inverse_ms": inverse[0] if inverse else None, "rel_l2": round(rel(y, x), 6),
                         "vs_tf32x3": round(rel(y, exact[name]), 7)}
        report[precision] = row
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
