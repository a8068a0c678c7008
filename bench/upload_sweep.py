"""On a CUDA machine: ways to move a received message (read-only host bytes) to the GPU.

    . bench/device_setup.sh && python bench/upload_sweep.py

A decode starts with the message's bytes in host memory (as ZeroMQ handed them over) and
needs them on the device, each part at an aligned offset. Wall-clock ms a call (median
and minimum of repeats, synchronised), for a key-sized message (8.2 MB: 56.6 MB of bf16
at 6.9x) and a delta-sized one:

- pinned: the codec's way (gpu._upload): one host copy into pinned memory, one upload;
- pageable: each part uploaded from where it is (the driver stages it itself);
- staged N: the parts cut into N pieces through two reused pinned buffers, the host copy
  of a piece overlapping the upload of the one before;
- and apart, for scale: the pinned allocation, the pinned way into a buffer allocated
  once, the host copy of the words alone, the upload alone.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from comfy_mesh.codec import gpu as gpu_codec
from comfy_mesh.codec.gpu_layout import aligned


def message(total: int) -> list[bytes]:
    """Parts like a gpu message's: a few small ones and the words (the bulk)."""
    g = torch.Generator().manual_seed(0)
    small = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
             for n in (12288, 12288, 4608, 2048, 14016, 448512)]
    words = torch.randint(0, 256, (total - sum(map(len, small)),), dtype=torch.uint8, generator=g)
    return small + [words.numpy().tobytes()]


def placed(chunks) -> tuple[list[tuple[torch.Tensor, int]], int]:
    """Each part as a uint8 tensor with its offset in the upload (ALIGN-ed, as gpu._upload
    puts them), and the upload's size."""
    out, at = [], 0
    for c in chunks:
        out.append((torch.frombuffer(c, dtype=torch.uint8), at))
        at += aligned(len(c))
    return out, at


def pageable(chunks, device):
    parts, total = placed(chunks)
    blob = torch.empty(total, dtype=torch.uint8, device=device)
    for src, at in parts:
        blob[at:at + src.numel()].copy_(src)
    return blob


class Staged:
    def __init__(self, pieces: int, piece_bytes: int):
        self.pieces = pieces
        self.stage = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.done = [torch.cuda.Event(), torch.cuda.Event()]
        self.used = [False, False]

    def __call__(self, chunks, device):
        parts, total = placed(chunks)
        blob = torch.empty(total, dtype=torch.uint8, device=device)
        piece = -(-total // self.pieces)
        k = 0
        for src, at in parts:
            for off in range(0, src.numel(), piece):
                m = min(piece, src.numel() - off)
                buf = self.stage[k % 2]
                if self.used[k % 2]:
                    self.done[k % 2].synchronize()
                buf[:m].copy_(src[off:off + m])
                blob[at + off:at + off + m].copy_(buf[:m], non_blocking=True)
                self.done[k % 2].record()
                self.used[k % 2] = True
                k += 1
        return blob


def kept_upload(chunks, host, device):
    """gpu._upload's copies into a pinned buffer allocated once."""
    parts, total = placed(chunks)
    ends = [at for _, at in parts[1:]] + [total]
    for (src, at), end in zip(parts, ends):
        host[at:at + src.numel()].copy_(src)
        host[at + src.numel():end] = 0  # only the padding, as gpu._upload
    return host.to(device, non_blocking=True)


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3), round(min(times), 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    device = torch.device("cuda")
    out = {"gpu": torch.cuda.get_device_name(), "torch_threads": torch.get_num_threads()}
    for name, total in (("key", 8_200_000), ("delta", 5_500_000)):
        chunks = message(total)
        ref = gpu_codec._upload(chunks, device)[0]
        row = {"pinned": timed(lambda: gpu_codec._upload(chunks, device), args.repeat)}
        assert torch.equal(pageable(chunks, device), ref)
        row["pageable"] = timed(lambda: pageable(chunks, device), args.repeat)
        for pieces in (2, 4, 8, 16):
            staged = Staged(pieces, -(-ref.numel() // pieces) + 64)
            assert torch.equal(staged(chunks, device), ref)
            row[f"staged {pieces}"] = timed(lambda: staged(chunks, device), args.repeat)
        row["pinned alloc only"] = timed(lambda: torch.empty(ref.numel(), dtype=torch.uint8, pin_memory=True),
                                         args.repeat)
        kept = torch.empty(ref.numel(), dtype=torch.uint8, pin_memory=True)
        row["pinned, buffer kept"] = timed(lambda: kept_upload(chunks, kept, device), args.repeat)
        host = torch.empty(ref.numel(), dtype=torch.uint8, pin_memory=True)
        src = torch.frombuffer(chunks[-1], dtype=torch.uint8)
        row["host copy only"] = timed(lambda: host[:src.numel()].copy_(src), args.repeat)
        row["dma only"] = timed(lambda: ref.copy_(host, non_blocking=True), args.repeat)
        out[name] = row
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
