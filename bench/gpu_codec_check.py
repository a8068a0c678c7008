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
from comfy_mesh.codec import gpu as gpu_codec, gpu_kernels
from comfy_mesh.codec.base import CodecError, EncodedTensor, StreamState
from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry, synthetic_steps
from comfy_mesh.codec.gpu_layout import N_CLASSES, Layout, row_classes, symbol_contexts


def timed(fn, repeat):
    """-> (result, median seconds); the minimum goes to LAST_MIN (wall times on the bench
    machine vary by tens of percent between calls)."""
    global LAST_MIN
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    LAST_MIN = min(times)
    return out, statistics.median(times)


LAST_MIN = 0.0


def profiled(fn, *activities):
    """The profiler's record of one call of `fn` (after one call unrecorded: compiles and
    captures happen there), CUDA activity unless other activities are named."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=list(activities or [torch.profiler.ProfilerActivity.CUDA])) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def busy_ms(fn) -> float:
    """GPU time of one call: the sum of its kernels' and copies' device times."""
    return round(sum(e.self_device_time_total for e in profiled(fn).key_averages()) / 1e3, 3)


def top_kernels(fn, n: int = 14) -> dict:
    prof = profiled(fn, torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:n]
    return {e.key[:60]: round(e.self_device_time_total / 1e3, 3) for e in rows if e.self_device_time_total > 0}


def host_syncs(fn) -> list[str]:
    """The operations in one call that made the host wait for the GPU (torch's sync debug mode)."""
    import warnings
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename.rsplit('/', 2)[-1]}:{w.lineno}" for w in caught]


def cpu_ops(fn, n: int = 12) -> dict:
    """Where one call's host time goes: the profiler's CPU self time per op, ms."""
    prof = profiled(fn, torch.profiler.ProfilerActivity.CPU)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return {e.key[:50]: round(e.self_cpu_time_total / 1e3, 3) for e in rows}


def kernels_match_reference(dev, side: int = 40, channels: int = 96, steps: int = 256) -> bool:
    """The Triton rANS kernels give the torch reference's bytes for one gpu-codec layout
    (64 text tokens, a side x side grid, two loud tokens)."""
    g = torch.Generator().manual_seed(0)
    lay = Layout(1, 64 + side * side, channels, 64, side, side, loud=(3, 77))
    n = lay.n_coef
    q = (torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))).round().clamp(-40000, 40000)
    q = torch.where(q.abs() >= 32768, torch.full_like(q, -32768), q).to(torch.int16)
    buckets = torch.randint(0, 32, (N_CLASSES, channels), dtype=torch.uint8, generator=g)
    ctx = symbol_contexts(lay, buckets)
    tok, nr, raw = E.tokenize(q.long())
    counts = torch.bincount(ctx * E.ALPHABET + tok, minlength=32 * E.ALPHABET).view(32, E.ALPHABET)
    freq = E.normalize_counts(counts)
    geo = E.Geometry.for_count(n, 32, steps, steps)
    ref = E.rans_encode(tok, nr, raw, ctx, freq, geo)
    cnt = torch.empty(geo.groups, dtype=torch.int32, device=dev)
    st = torch.empty(geo.groups * geo.lanes, dtype=torch.int32, device=dev)
    buf = T.encode(T.pack_symbols(q, ctx).to(dev), torch.tensor(n, device=dev), T.packed_tables(freq.to(dev)), geo,
                   cnt, st)
    out = torch.empty(buf.numel(), dtype=torch.int16, device=dev)
    T.gather_words(buf, cnt, out)
    words = out[: int(cnt.sum())].cpu().long() & 0xFFFF
    states = st.view(geo.groups, geo.lanes).cpu().long() & 0xFFFFFFFF
    same = torch.equal(words, ref.words) and torch.equal(states, ref.states)
    bad, marks = torch.zeros(1, dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)
    group_words = ref.group_words.int().to(dev)
    # int64 words and states wrap to int16 / int32 bit patterns, as they travel
    values = T.decode(ref.words.to(torch.int16).to(dev), torch.tensor([ref.words.numel()], device=dev),
                      T.group_starts(group_words), group_words, ref.states.to(torch.int32).to(dev), buckets.to(dev),
                      (row_classes(lay, dev) * channels).int(), freq.to(dev), geo, bad, marks)
    expect = torch.where(tok == E.ESCAPE, T.ESCAPE_MARK, E.detokenize(tok, raw)).to(torch.int16)
    marked = int((tok == E.ESCAPE).sum())
    return bool(same and torch.equal(values.cpu(), expect) and int(marks) == marked and int(bad) == 0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=6144)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rel-errs", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    p.add_argument("--min-steps", type=int, nargs="+", default=[1024])
    args = p.parse_args()
    dev = torch.device("cuda")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    # 1. kernels vs reference: the same bytes, and back
    report["kernels_match_reference"] = kernels_match_reference(dev)

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

    # 3. speed: wall time with the host bytes (what a caller waits for), and the GPU's
    # busy time (sum of kernel and copy times, from the profiler)
    report["carry_mb"] = x.numel() * 2 / 1e6
    for rel in args.rel_errs:
        for min_steps in args.min_steps:
            c = get("gpu", rel_err=rel, min_steps=min_steps)
            m, enc_s = timed(lambda: c.encode(x, layout=spec.layout), args.repeat)
            enc_min = LAST_MIN
            _, dec_s = timed(lambda: decode(m, dev), args.repeat)
            dec_min = LAST_MIN
            y = decode(m, dev).float()
            report[f"rel_err_{rel}_steps_{min_steps}"] = {
                "ratio": x.numel() * 2 / m.nbytes, "rel_l2": float((y - x.float()).norm() / x.float().norm()),
                "encode_ms": enc_s * 1e3, "decode_ms": dec_s * 1e3, "gbps": x.numel() * 2 / 1e9 / (enc_s + dec_s),
                "encode_min_ms": enc_min * 1e3, "decode_min_ms": dec_min * 1e3,
                "encode_gpu_busy_ms": busy_ms(lambda: c.encode(x, layout=spec.layout)),
                "decode_gpu_busy_ms": busy_ms(lambda: decode(m, dev)), "rans": m.header["rans"]}
    eager = get("gpu", rel_err=0.05, graphs=False)
    m, enc_s = timed(lambda: eager.encode(x, layout=spec.layout), args.repeat)
    report["rel_err_0.05_without_graphs"] = {"encode_ms": enc_s * 1e3, "encode_min_ms": LAST_MIN * 1e3,
                                             "ratio": x.numel() * 2 / m.nbytes,
                                             "rel_l2": float((decode(m, dev).float() - x.float()).norm()
                                                             / x.float().norm())}
    codec = get("gpu", rel_err=0.05)
    msg = codec.encode(x, layout=spec.layout)
    report["encode_top_kernels_ms"] = top_kernels(lambda: codec.encode(x, layout=spec.layout))
    report["decode_top_kernels_ms"] = top_kernels(lambda: decode(msg, dev))
    report["encode_host_syncs"] = host_syncs(lambda: codec.encode(x, layout=spec.layout))
    report["decode_host_syncs"] = host_syncs(lambda: decode(msg, dev))
    report["encode_cpu_ops_ms"] = cpu_ops(lambda: codec.encode(x, layout=spec.layout))
    report["decode_cpu_ops_ms"] = cpu_ops(lambda: decode(msg, dev))
    # the captured decoder against the launched one, and corrupt words refused by both
    eager_dec = get("gpu", graphs=False)
    report["captured_decode_equals_launched"] = bool(torch.equal(decode(msg, dev), eager_dec.decode(msg, dev)))
    words = msg.header["parts"]
    names = list(words)
    bad_words = bytes(b ^ 0x5A for b in bytes(msg.buffers[names.index("words")]))
    broken = EncodedTensor(msg.header, [bad_words if n == "words" else b for n, b in zip(names, msg.buffers)])
    refused = []
    for decoder in (codec, eager_dec):
        try:
            decoder.decode(broken, dev)
            refused.append(False)
        except CodecError:
            refused.append(True)
    report["corrupt_words_refused_captured_and_launched"] = refused
    # the encoder's host phases: launching everything, waiting for the sizes, the rest
    phases = []
    for _ in range(args.repeat):
        gpu_kernels.PHASES = {}
        torch.cuda.synchronize()
        codec.encode(x, layout=spec.layout)
        done = time.perf_counter()
        t = gpu_kernels.PHASES
        phases.append((t["queued"] - t["start"], t["sizes"] - t["queued"], done - t["sizes"]))
    gpu_kernels.PHASES = None
    report["encode_phases_ms"] = {name: round(statistics.median(v[i] for v in phases) * 1e3, 3) for i, name in
                                  enumerate(("launch_all", "wait_for_sizes", "after_sizes"))}
    # the host half of a decode: received buffers into pinned memory and up
    _, up_s = timed(lambda: gpu_codec._upload(msg.buffers, dev), args.repeat)
    report["decode_upload_ms"] = up_s * 1e3
    # the rANS tables from a sample: ratio and histogram time by share of the programs
    shares, default_share = {}, gpu_kernels.HIST_SHARE
    codec = get("gpu", rel_err=0.05, graphs=False)  # a captured graph keeps the share it was captured with
    for share in (1, 16, 32, 64):
        gpu_kernels.HIST_SHARE = share
        m = codec.encode(x, layout=spec.layout)
        shares[share] = {"ratio": round(x.numel() * 2 / m.nbytes, 3),
                         "histogram_ms": top_kernels(lambda: codec.encode(x, layout=spec.layout), n=100).get(
                             "_histogram_kernel")}
    report["histogram_share"] = shares
    gpu_kernels.HIST_SHARE = default_share
    # ... and the histogram kernel's time by how many histograms its atomics spread over
    copies, default_copies = {}, gpu_kernels.HIST_COPIES
    for n in (1, 4, 16, 32, 128):
        gpu_kernels.HIST_COPIES = n
        copies[n] = top_kernels(lambda: codec.encode(x, layout=spec.layout), n=100).get("_histogram_kernel")
    report["histogram_copies_ms"] = copies
    gpu_kernels.HIST_COPIES = default_copies
    codec = get("gpu", rel_err=0.05)
    # temporal: correlated pairs; the delta message against a key message of the same step
    for rho in (0.9, 0.95):
        a, b = (t.to(dev, torch.bfloat16) for t in synthetic_steps(spec, rho=rho, steps=2))
        for rel in args.rel_errs:
            c = get("gpu", rel_err=rel)
            enc_state, dec_state = StreamState(), StreamState()
            decode(c.encode(a, state=enc_state, layout=spec.layout), dev, state=dec_state)
            d = c.encode(b, state=enc_state, layout=spec.layout)
            yb = decode(d, dev, state=dec_state).float()
            single = c.encode(b, layout=spec.layout)
            ys = decode(single, dev).float()
            report[f"temporal_rho_{rho}_rel_err_{rel}"] = {
                "gain": (b.numel() * 2 / d.nbytes) / (b.numel() * 2 / single.nbytes),
                "delta_ratio": b.numel() * 2 / d.nbytes, "single_ratio": b.numel() * 2 / single.nbytes,
                "delta_rel_l2": float((yb - b.float()).norm() / b.float().norm()),
                "single_rel_l2": float((ys - b.float()).norm() / b.float().norm()),
                "references_agree": bool(torch.equal(enc_state.reference["coef"], dec_state.reference["coef"]))}
    print(json.dumps(report))
    return 0 if report["kernels_match_reference"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
