"""`comfy-mesh bench codec`: rate, distortion and speed of each codec on the corpus.

For every corpus entry, codec and quality: `ratio` (bf16 bytes over every wire byte,
header included), `rel_l2`, `rel_l2_centred` (error over the norm with each channel's
median removed, so massive-offset channels do not flatter the figure), the worst
channel's cosine, and encode/decode throughput in GB/s of bf16 input. Step pairs also
report the temporal (delta) message of their second step. A codec this machine cannot
run (nvenc without an encoder, x265 without PyAV) gets one row saying why.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

from . import capabilities, decode, get
from .base import StreamState, TokenLayout
from .corpus import CorpusSpec, captured, corpus

DEFAULT_GRID = {
    "raw": [{}],
    "cpu": [{"quality": 4}, {"quality": 7}, {"quality": 12}],
    "gpu": [{"rel_err": 0.02}, {"rel_err": 0.05}, {"rel_err": 0.10}],
    "x265": [{"quality": 4}, {"quality": 7}, {"quality": 12}],
    "nvenc": [{"quality": 4}, {"quality": 7}, {"quality": 12}],
}


def machine() -> dict:
    """What a CPU benchmark ran on, for its report (the load matters: speeds on a shared
    2-core VM move by tens of percent)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeat: int, device: torch.device | str = "cpu") -> tuple[float, object]:
    """Fastest of `repeat` calls after one warm-up, and the last result (GPU work synced)."""
    dev = torch.device(device)
    out = fn()
    _sync(dev)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best, out


# On an H100 (gpu codec, 6144 channels) the first encode of a shape captured its graphs
# (10-20 ms; a minute with compiles on a fresh machine) and the second took 5-10 ms
# (probably a pinned host buffer allocated for its message while the first's was still
# held); from the third on, about 1 ms. A median of 3 without these reported 6-10 GB/s.
WARM_UP_CALLS = 2


def _timed(fn, device, repeat: int):
    """-> (the last result, median seconds of `repeat` calls) after WARM_UP_CALLS untimed
    ones, so that the figures are a long generation's steady state (bench/NOTES.md)."""
    for _ in range(WARM_UP_CALLS):
        fn()
    _sync(device)
    times, out = [], None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def metrics(x: torch.Tensor, y: torch.Tensor) -> dict:
    x, y = x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, x.shape[-1])
    centred = x - x.median(dim=0).values
    err = (y - x).norm()
    cos = torch.nn.functional.cosine_similarity(centred, y - x.median(dim=0).values, dim=0)
    return {"rel_l2": float(err / x.norm()), "rel_l2_centred": float(err / centred.norm()),
            "worst_channel_cos": float(cos.min())}


def measure(name: str, settings: dict, x: torch.Tensor, layout: TokenLayout | None, device: torch.device,
            repeat: int, previous: torch.Tensor | None = None) -> dict:
    codec = get(name, **settings)
    x = x.to(device, torch.bfloat16)
    gbytes = x.numel() * 2 / 1e9
    row = {"codec": name, **settings}
    if previous is not None:  # temporal: code `x` as the delta after `previous`
        enc, dec = StreamState(), StreamState()
        decode(codec.encode(previous.to(device, torch.bfloat16), state=enc, layout=layout), device, state=dec)
        msg = codec.encode(x, state=enc, layout=layout)
        y = decode(msg, device, state=dec)
        row["temporal"] = bool(msg.header.get("stream", {}).get("delta"))
    else:
        msg, enc_s = _timed(lambda: codec.encode(x, layout=layout), device, repeat)
        y, dec_s = _timed(lambda: decode(msg, device), device, repeat)
        row |= {"encode_gbps": gbytes / enc_s, "decode_gbps": gbytes / dec_s, "encode_ms": enc_s * 1e3,
                "decode_ms": dec_s * 1e3}
    row |= {"ratio": x.numel() * 2 / msg.nbytes, "bytes": msg.nbytes, **metrics(x, y)}
    return row


class UnknownCodec(ValueError):
    """A codec name the benchmark has no settings for (the command's usage error)."""


def run(device: str = "cpu", channels: int = 768, repeat: int = 3, codecs: list[str] | None = None,
        with_captured: bool = True) -> dict:
    dev = torch.device(device)
    unknown = sorted(set(codecs or ()) - set(DEFAULT_GRID))
    if unknown:
        raise UnknownCodec(f"unknown codec {', '.join(unknown)}: the benchmark knows {', '.join(DEFAULT_GRID)}")
    entries = corpus(channels=channels)
    layout = CorpusSpec().layout
    results = []
    asked = [name for name in DEFAULT_GRID if codecs is None or name in codecs]
    usable = capabilities(asked)  # (only those: nvenc's probe opens an encoder session)
    grid = {}
    for name in asked:
        settings_list = DEFAULT_GRID[name]
        if usable[name][0]:
            grid[name] = settings_list
        else:  # (nvenc on a card without an encoder, x265 without PyAV): said, not left out silently
            results.append({"entry": "all", "codec": name, "skipped": usable[name][1]})
    for entry, data in entries.items():
        for name, settings_list in grid.items():
            for settings in settings_list:
                if isinstance(data, list):  # a step pair: single message of step 2, then its delta
                    row = measure(name, settings, data[1], layout, dev, repeat)
                    delta = measure(name, settings, data[1], layout, dev, 1, previous=data[0])
                    row["temporal_ratio"] = delta["ratio"]
                    row["temporal_rel_l2"] = delta["rel_l2"]
                    row["temporal_gain"] = delta["ratio"] / row["ratio"]
                else:
                    row = measure(name, settings, data, layout, dev, repeat)
                results.append({"entry": entry, **row})
    if with_captured:
        try:
            steps = captured()
        except ImportError as exc:
            results.append({"entry": "captured", "codec": "all", "skipped": f"needs scikit-image: {exc}"})
        else:
            cap_layout = TokenLayout(64, 32, 32)
            for name, settings_list in grid.items():
                for settings in settings_list:
                    row = measure(name, settings, steps[2], cap_layout, dev, repeat)
                    delta = measure(name, settings, steps[2], cap_layout, dev, 1, previous=steps[1])
                    results.append({"entry": "captured flux2 (tiny, astronaut)", **row,
                                    "temporal_ratio": delta["ratio"], "temporal_gain": delta["ratio"] / row["ratio"]})
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {"device": device, "gpu": gpu_name, "channels": channels, "tokens": layout.tokens, "results": results}


def format_table(report: dict) -> str:
    lines = [f"device {report['device']} {report['gpu'] or ''}  corpus {report['tokens']} tokens x "
             f"{report['channels']} channels, bf16"]
    lines.append(f"{'entry':34s} {'codec':16s} {'ratio':>7s} {'rel_l2':>7s} {'centred':>8s} {'worst cos':>9s} "
                 f"{'enc GB/s':>8s} {'dec GB/s':>8s} {'delta x':>7s}")
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"{r['entry']:34s} {r['codec']:16s} skipped: {r['skipped']}")
            continue
        knob = ",".join(f"{k}={v}" for k, v in r.items() if k in ("quality", "rel_err"))
        lines.append(f"{r['entry'][:34]:34s} {r['codec'] + ' ' + knob:16s} {r['ratio']:7.2f} "
                     f"{r['rel_l2']:7.4f} {r['rel_l2_centred']:8.4f} {r['worst_channel_cos']:9.4f} "
                     f"{r.get('encode_gbps', 0):8.3f} {r.get('decode_gbps', 0):8.3f} "
                     f"{r.get('temporal_gain', float('nan')):7.2f}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--channels", type=int, default=768, help="hidden size of the corpus (default 768)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed repetitions after two warm-up calls, median reported (default 3)")
    p.add_argument("--codecs", default=None,
                   help=f"comma-separated subset of {','.join(DEFAULT_GRID)} (default: all; those this machine "
                        "cannot run are listed as skipped, with the reason)")
    p.add_argument("--no-captured", action="store_true", help="skip the activations captured from the model")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    try:
        report = run(args.device, args.channels, args.repeat, args.codecs.split(",") if args.codecs else None,
                     with_captured=not args.no_captured)
    except UnknownCodec as exc:
        print(f"comfy-mesh bench codec: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_table(report))
    return 0
