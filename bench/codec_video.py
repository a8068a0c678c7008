"""Benchmark the x265 video codec against the cpu codec on activation tensors.

Prints one JSON document on stdout (machine, tensors, one row per codec setting) and a
short table on stderr. Sizes are every byte on the wire (header + buffers); ratios are
against the tensor in bfloat16; throughput is on the input tensor's own bytes (2 bytes
per element for bfloat16), best of `--repeat` runs after one warm-up. `cpu_ratio_at_same_error`
interpolates the cpu codec's ratio at the x265 row's error (log-log between cpu qualities),
so the two codecs are compared at equal accuracy.

    python bench/codec_video.py                    # activation_like 4608 x 256 (the test tensor)
    python bench/codec_video.py --corpus           # codec/corpus.py entries, with their token layout
    python bench/codec_video.py --channels 6144 --qps 13 --cpu-qualities 7
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from typing import Any

import torch

from comfy_mesh.codec import decode, get
from comfy_mesh.codec.bench import best_time, machine
from comfy_mesh.codec.checks import DTYPES
from comfy_mesh.codec.synthetic import ActivationShape, activation_like

log = logging.getLogger("bench.codec_video")


def measure(x: torch.Tensor, codec_name: str, settings: dict, repeat: int, layout: Any = None) -> dict[str, Any]:
    codec = get(codec_name, **settings)
    kwargs = {"layout": layout} if layout is not None else {}
    t_enc, message = best_time(lambda: codec.encode(x, **kwargs), repeat)
    t_dec, y = best_time(lambda: decode(message), repeat)
    x64, y64 = x.double(), y.double()
    err = (y64 - x64).norm()
    centred = x64 - x64.reshape(-1, x.shape[-1]).median(dim=0).values
    in_bytes = x.numel() * x.element_size()
    h = message.header
    row = {
        "codec": codec_name,
        "settings": settings,
        "layout_hint": layout is not None,
        "ratio_vs_bf16": round(x.numel() * 2 / message.nbytes, 4),
        "bytes": message.nbytes,
        "rel_l2": float(err / x64.norm()),
        "rel_l2_centred": float(err / centred.norm()),
        "rel_err_bound": message.rel_err_bound,
        "cosine": float(torch.nn.functional.cosine_similarity(x64.flatten(), y64.flatten(), dim=0)),
        "n_outliers": h.get("n_outliers"),
        "encode_MBps": round(in_bytes / t_enc / 1e6, 1),
        "decode_MBps": round(in_bytes / t_dec / 1e6, 1),
        "encode_ms": round(t_enc * 1e3, 1),
        "decode_ms": round(t_dec * 1e3, 1),
    }
    if codec_name != "cpu":
        row.update({
            "qp": h["qp"], "rel_err_measured": h.get("rel_err_measured"),
            "frames": f"{h['n_frames']} x {h['frame_w']}x{h['frame_h']} {h['pix_fmt']}",
            "grid": [h["grid_width"], h["prefix_tokens"]],
            "bitstream_bytes": sum(h["frame_bytes"]),
        })
    return row


def cpu_ratio_at(err: float, cpu_rows: list[dict]) -> float | None:
    """The cpu codec's ratio at error `err`, log-log interpolated (None outside the range)."""
    pts = sorted((r["rel_l2"], r["ratio_vs_bf16"]) for r in cpu_rows)
    for (e0, r0), (e1, r1) in zip(pts, pts[1:]):
        if e0 <= err <= e1 and e0 > 0:
            f = (math.log(err) - math.log(e0)) / (math.log(e1) - math.log(e0)) if e1 > e0 else 0.0
            return round(math.exp(math.log(r0) + f * (math.log(r1) - math.log(r0))), 4)
    return None


def tensors(args: argparse.Namespace) -> list[tuple[str, torch.Tensor, Any]]:
    """(name, tensor, TokenLayout hint or None) to report on."""
    dtype = DTYPES[args.dtype]
    if not args.corpus:
        x = activation_like(ActivationShape(tokens=args.tokens, channels=args.channels), seed=args.seed)
        return [(f"activation_like {args.tokens}x{args.channels}", x.to(dtype), None)]
    from comfy_mesh.codec.corpus import CorpusSpec, corpus

    layout = CorpusSpec().layout
    out = []
    for name, value in corpus(seed=args.seed, channels=args.corpus_channels).items():
        if isinstance(value, list):  # step pairs: a single carry is what these codecs see
            continue
        out.append((name, value.to(dtype), layout))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--qps", type=int, nargs="+", default=[4, 9, 13, 18, 24, 30])
    parser.add_argument("--presets", nargs="+", default=["ultrafast", "medium"],
                        help="x265 presets; the first runs every QP, the others QP 13 only")
    parser.add_argument("--cpu-qualities", type=float, nargs="+", default=[2, 3, 4, 6, 7, 8, 12, 16])
    parser.add_argument("--corpus", action="store_true", help="codec/corpus.py entries instead of activation_like")
    parser.add_argument("--corpus-channels", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    results = []
    for name, x, layout in tensors(args):
        cpu_rows = [measure(x, "cpu", {"quality": q}, args.repeat) for q in args.cpu_qualities]
        video_rows = []
        for preset_index, preset in enumerate(args.presets):
            qps = args.qps if preset_index == 0 else [13]
            for qp in qps:
                video_rows.append(measure(x, "x265", {"qp": qp, "preset": preset}, args.repeat, layout))
        if layout is not None:  # the same on a grid 8 tokens too wide: what the token layout is worth
            misaligned = {"qp": 13, "preset": args.presets[0], "grid_width": layout.w + 8}
            video_rows.append(measure(x, "x265", misaligned, args.repeat))
        for row in video_rows:
            row["cpu_ratio_at_same_error"] = cpu_ratio_at(row["rel_l2"], cpu_rows)
        results.append({"tensor": name, "shape": list(x.shape), "dtype": args.dtype,
                        "layout": None if layout is None else dataclasses.asdict(layout),
                        "x265": video_rows, "cpu": cpu_rows})

    report = {
        "benchmark": "codec_video",
        "machine": machine(),
        "seed": args.seed,
        "results": results,
    }
    json.dump(report, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")

    for r in results:
        log.info("%s %s %s", r["tensor"], r["shape"], r["dtype"])
        log.info("  %-28s %7s %9s %9s %9s %8s %8s %8s", "codec", "ratio", "rel_l2", "bound", "cpu@err",
                 "enc MB/s", "dec MB/s", "outliers")
        for row in r["x265"] + r["cpu"]:
            grid = " grid" if row["layout_hint"] else f" w={row['settings']['grid_width']}" if "grid_width" in row["settings"] else ""
            label = (f"x265 qp{row['qp']} {row['settings'].get('preset')}{grid}"
                     if row["codec"] == "x265" else f"cpu q{row['settings']['quality']:g}")
            log.info("  %-28s %7.3f %9.5f %9.5f %9s %8.1f %8.1f %8s", label, row["ratio_vs_bf16"], row["rel_l2"],
                     row["rel_err_bound"], row.get("cpu_ratio_at_same_error") or "-", row["encode_MBps"],
                     row["decode_MBps"], row["n_outliers"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
