"""On a CUDA machine: GPU time of the gpu codec in temporal mode (the product's default),
key and delta messages, through the captured graphs, as a generation runs them.

    . bench/device_setup.sh && python bench/temporal_pair.py --channels 6144

bench/gpu_codec_check.py times messages without a stream (nothing kept between them);
here every encode and decode keeps the stream's reference, and a delta message starts
from one: the tensors a graph reads and writes that change from call to call are the
carry, the reference and the outputs. Prints one JSON object: for each of key and delta,
encode and decode, the summed GPU time of one call and its largest kernels and copies.
"""

from __future__ import annotations

import argparse
import json

import torch

from comfy_mesh.codec import get
from comfy_mesh.codec.base import StreamState
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_steps
from gpu_codec_profile import kernel_table  # this script's folder is on the path when it runs


def _set_prob_bits(bits: int) -> None:
    """Every module's copy of the rANS probability precision, before anything is coded."""
    from comfy_mesh.codec import entropy, entropy_triton, gpu, gpu_kernels

    entropy.PROB_BITS = entropy_triton.PROB_BITS = bits
    entropy.PROB_SCALE = gpu.PROB_SCALE = gpu_kernels.PROB_SCALE = 1 << bits


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=6144)
    p.add_argument("--rel-err", type=float, default=0.05)
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--min-steps", type=int, default=None, help="rANS steps a lane (default: the codec's)")
    p.add_argument("--prob-bits", type=int, default=None,
                   help="rANS probability bits (default: entropy.PROB_BITS; another value writes messages of "
                        "another format, for this measurement only)")
    args = p.parse_args()
    if args.prob_bits:
        _set_prob_bits(args.prob_bits)
    dev = torch.device("cuda")
    spec = CorpusSpec(channels=args.channels)
    a, b = (t.to(dev, torch.bfloat16) for t in synthetic_steps(spec, rho=args.rho, steps=2))
    codec = get("gpu", rel_err=args.rel_err, **({"min_steps": args.min_steps} if args.min_steps else {}))
    sent, received = StreamState(), StreamState()
    key = codec.encode(a, state=sent, layout=spec.layout)
    before_key = received.copy()
    codec.decode(key, dev, state=received)
    delta = codec.encode(b, state=sent.copy(), layout=spec.layout)
    assert delta.header["stream"]["delta"], "the second message should be a delta"
    report = {"gpu": torch.cuda.get_device_name(), "carry_mb": a.numel() * 2 / 1e6, "prob_bits": args.prob_bits,
              "ratio_key": round(a.numel() * 2 / key.nbytes, 3), "ratio_delta": round(b.numel() * 2 / delta.nbytes, 3)}
    calls = {
        "key_encode": lambda: codec.encode(a, state=StreamState(), layout=spec.layout),
        "key_decode": lambda: codec.decode(key, dev, state=before_key.copy()),
        "delta_encode": lambda: codec.encode(b, state=sent.copy(), layout=spec.layout),
        "delta_decode": lambda: codec.decode(delta, dev, state=received.copy()),
    }
    for name, call in calls.items():
        table = kernel_table(call)
        report[name] = {"gpu_ms": table["total_ms"], "span_ms": table["span_ms"], "launches": table["launches"],
                        "top": dict(list(table["kernels"].items())[:7])}
    report["pair_key_ms"] = round(report["key_encode"]["gpu_ms"] + report["key_decode"]["gpu_ms"], 3)
    report["pair_delta_ms"] = round(report["delta_encode"]["gpu_ms"] + report["delta_decode"]["gpu_ms"], 3)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
