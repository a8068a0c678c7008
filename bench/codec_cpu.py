"""Benchmark the cpu codec on a synthetic activation-like tensor.

Prints one JSON document on stdout (machine, settings, one row per quality) and a
short table on stderr. Throughput is measured on the input tensor's own bytes
(2 bytes per element for bfloat16), best of `--repeat` runs.

    python bench/codec_cpu.py                       # 4608 x 256, the test tensor
    python bench/codec_cpu.py --channels 6144       # one FLUX.2 dev hidden state
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import torch

from comfy_mesh.codec import decode, get
from comfy_mesh.codec.bench import best_time, machine
from comfy_mesh.codec.checks import DTYPES
from comfy_mesh.codec.cpu import CpuSettings
from comfy_mesh.codec.synthetic import ActivationShape, activation_like

log = logging.getLogger("bench.codec_cpu")


def measure(x: torch.Tensor, quality: float, zstd_level: int, repeat: int) -> dict[str, Any]:
    codec = get("cpu", quality=quality, zstd_level=zstd_level)
    t_enc, message = best_time(lambda: codec.encode(x), repeat)
    t_dec, y = best_time(lambda: decode(message), repeat)
    x64, y64 = x.double(), y.double()
    err = (y64 - x64).norm()
    # Error against the tensor minus its channel medians: not flattered by DC offsets.
    centred = x64 - x64.reshape(-1, x.shape[-1]).median(dim=0).values
    bf16_bytes = x.numel() * 2
    in_bytes = x.numel() * x.element_size()
    return {
        "quality": quality,
        "ratio_vs_bf16": round(bf16_bytes / message.nbytes, 4),
        "bytes": message.nbytes,
        "rel_l2": float(err / x64.norm()),
        "rel_l2_centred": float(err / centred.norm()),
        "rel_err_bound": message.rel_err_bound,
        "cosine": float(torch.nn.functional.cosine_similarity(x64.flatten(), y64.flatten(), dim=0)),
        "n_outliers": message.header["n_outliers"],
        "qdtype": message.header["qdtype"],
        "encode_MBps": round(in_bytes / t_enc / 1e6, 1),
        "decode_MBps": round(in_bytes / t_dec / 1e6, 1),
        "encode_ms": round(t_enc * 1e3, 2),
        "decode_ms": round(t_dec * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--qualities", type=float, nargs="+", default=[4, 6, 8, 12])
    parser.add_argument("--zstd-level", type=int, default=CpuSettings().zstd_level)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    x = activation_like(ActivationShape(tokens=args.tokens, channels=args.channels), seed=args.seed)
    x = x.to(DTYPES[args.dtype])
    rows = [measure(x, q, args.zstd_level, args.repeat) for q in args.qualities]
    report = {
        "benchmark": "codec_cpu",
        "machine": machine(),
        "tensor": {"tokens": args.tokens, "channels": args.channels, "dtype": args.dtype, "seed": args.seed},
        "zstd_level": args.zstd_level,
        "results": rows,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")

    log.info("%7s %7s %9s %9s %9s %9s %9s", "quality", "ratio", "rel_l2", "centred", "bound", "enc MB/s", "dec MB/s")
    for r in rows:
        log.info(
            "%7g %7.3f %9.5f %9.5f %9.5f %9.1f %9.1f",
            r["quality"], r["ratio_vs_bf16"], r["rel_l2"], r["rel_l2_centred"], r["rel_err_bound"],
            r["encode_MBps"], r["decode_MBps"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
