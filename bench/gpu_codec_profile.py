"""On a CUDA machine: every kernel and copy of one gpu-codec encode and decode, with its GPU time.

    . bench/device_setup.sh && python bench/gpu_codec_profile.py --channels 6144

bench/gpu_codec_check.py gives the totals; this gives the whole list (aggregated by kernel
name, with how many launches), so the "small ops" between the big kernels can be counted.
The kernels are profiled on the launched path (graphs=False: the same kernels a captured
graph replays, each visible to the profiler); the captured path's total is printed beside
it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from comfy_mesh.codec import decode, get
from comfy_mesh.codec.base import StreamState
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry, synthetic_steps
from gpu_codec_check import profiled  # this script's folder is on the path when it runs


def kernel_table(fn) -> dict:
    """-> {"total_ms", "span_ms", "launches", "kernels": {name: [launches, ms]}} for one call,
    on the GPU: total_ms sums the kernels' and copies' times; span_ms runs from the first's
    start to the last's end, so it also counts the gaps between them (a graph's small
    nodes cost those too)."""
    rows: dict = defaultdict(lambda: [0, 0.0])
    starts, ends = [], []
    for e in profiled(fn).events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = rows[e.name[:70]]
            row[0] += 1
            row[1] += e.device_time / 1e3
            starts.append(e.time_range.start)
            ends.append(e.time_range.end)
    ordered = sorted(rows.items(), key=lambda kv: -kv[1][1])
    return {"total_ms": round(sum(v[1] for v in rows.values()), 3),
            "span_ms": round((max(ends) - min(starts)) / 1e3, 3) if starts else 0.0,
            "launches": sum(v[0] for v in rows.values()),
            "kernels": {k: [v[0], round(v[1], 4)] for k, v in ordered}}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=6144)
    p.add_argument("--rel-err", type=float, default=0.05)
    args = p.parse_args()
    dev = torch.device("cuda")
    spec = CorpusSpec(channels=args.channels)
    x = synthetic_carry(spec).to(dev, torch.bfloat16)
    report = {"gpu": torch.cuda.get_device_name(), "carry_mb": x.numel() * 2 / 1e6}
    for graphs in (False, True):
        codec = get("gpu", rel_err=args.rel_err, graphs=graphs)
        msg = codec.encode(x, layout=spec.layout)
        name = "captured" if graphs else "launched"
        report[f"encode_{name}"] = kernel_table(lambda: codec.encode(x, layout=spec.layout))
        report[f"decode_{name}"] = kernel_table(lambda: codec.decode(msg, dev))
        if graphs:  # the per-kernel list is the launched one's; here only the totals
            for side in ("encode", "decode"):
                report[f"{side}_{name}"].pop("kernels")
        report[f"ratio_{name}"] = round(x.numel() * 2 / msg.nbytes, 3)
    # a delta message (temporal mode): the same list
    a, b = (t.to(dev, torch.bfloat16) for t in synthetic_steps(spec, rho=0.9, steps=2))
    codec = get("gpu", rel_err=args.rel_err, graphs=False)
    enc_state, dec_state = StreamState(), StreamState()
    decode(codec.encode(a, state=enc_state, layout=spec.layout), dev, state=dec_state)

    def delta_encode():
        # encode against the key message's reference each time (a copy: encoding moves it on)
        return codec.encode(b, state=enc_state.copy(), layout=spec.layout)

    report["encode_delta_launched"] = kernel_table(delta_encode)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
