"""On a CUDA machine: the gpu codec's fused kernels, cross-device decoding, and its speed.

    . bench/device_setup.sh && python bench/gpu_codec_check.py --channels 6144

1. The Triton rANS kernels produce the torch reference's bytes, and decode them back.
2. A message encoded on the GPU decodes on the CPU (and the reverse) within its bound.
3. Encode and decode time of one FLUX.2-dev-sized carry (4608 x 6144 bf16, 56.6 MB),
   split into stages, median of repeats. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from comfy_mesh.codec import decode, get
from comfy_mesh.codec import entropy as E
from comfy_mesh.codec import entropy_triton as T
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=6144)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    dev = torch.device("cuda")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    # 1. kernels vs reference
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(300_000, generator=g) * torch.exp(2 * torch.randn(300_000, generator=g))).round().long()
    q[7] = 10 ** 6
    tok, nr, raw = E.tokenize(q)
    ctx = torch.arange(q.numel()) % 9
    counts = torch.zeros(9, E.ALPHABET, dtype=torch.long).index_put_((ctx, tok), torch.ones_like(tok), accumulate=True)
    freq = E.normalize_counts(counts)
    geo = E.Geometry.for_count(q.numel(), 64, 1024)
    ref = E.rans_encode(tok, nr, raw, ctx, freq, geo)
    got = T.rans_encode(*(t.to(dev) for t in (tok, nr, raw, ctx, freq)), geo)
    same = torch.equal(ref.words, got.words.cpu()) and torch.equal(ref.states, got.states.cpu())
    t2, r2 = T.rans_decode(E.RansStreams(*(t.to(dev) for t in (ref.words, ref.group_words, ref.states))),
                           ctx.to(dev), freq.to(dev), geo)
    report["kernels_match_reference"] = bool(same and torch.equal(t2.cpu(), tok) and torch.equal(r2.cpu(), raw))

    # 2. cross-device
    spec = CorpusSpec(channels=args.channels)
    x = synthetic_carry(spec).to(dev, torch.bfloat16)
    codec = get("gpu", rel_err=0.05)
    msg = codec.encode(x, layout=spec.layout)
    y_cpu = decode(msg, "cpu").float()
    y_gpu = decode(msg, dev).float().cpu()
    xf = x.float().cpu()
    report["gpu_to_cpu_rel_err"] = float((y_cpu - xf).norm() / xf.norm())
    report["gpu_to_gpu_rel_err"] = float((y_gpu - xf).norm() / xf.norm())
    report["bound"] = msg.rel_err_bound
    small = synthetic_carry(CorpusSpec(channels=256)).bfloat16()
    back = decode(get("gpu").encode(small, layout=spec.layout), dev).float().cpu()
    report["cpu_to_gpu_rel_err"] = float((back - small.float()).norm() / small.float().norm())

    # 3. speed
    report["carry_mb"] = x.numel() * 2 / 1e6
    for rel in (0.02, 0.05, 0.1):
        c = get("gpu", rel_err=rel)
        m, enc_s = timed(lambda: c.encode(x, layout=spec.layout), args.repeat)
        _, dec_s = timed(lambda: decode(m, dev), args.repeat)
        report[f"rel_err_{rel}"] = {"ratio": x.numel() * 2 / m.nbytes, "encode_ms": enc_s * 1e3,
                                    "decode_ms": dec_s * 1e3,
                                    "gbps": x.numel() * 2 / 1e9 / (enc_s + dec_s)}
    # where encode time goes (one profile of the default setting)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        codec.encode(x, layout=spec.layout)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
    report["encode_top_kernels_ms"] = {e.key[:60]: round(e.device_time_total / 1e3, 3) for e in rows}
    msg = codec.encode(x, layout=spec.layout)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        decode(msg, dev)
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:14]
    report["decode_top_ops_cpu_ms"] = {e.key[:60]: round(e.cpu_time_total / 1e3, 3) for e in rows}
    print(json.dumps(report))
    return 0 if report["kernels_match_reference"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
