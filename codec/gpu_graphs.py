"""CUDA graphs for the `gpu` codec's fused kernels (codec/gpu_kernels.py): one per shape.

Launched one by one from Python, an encode's ~70 kernels cost 3.7 ms of host time on an
H200 against 1.3 ms of GPU time, and a decode's ~45 cost about twice its GPU time. A
captured graph replays them in one call. Each graph owns its input, staging and output
buffers: inputs are copied in, outputs copied out before the next replay (a lock per
graph keeps to one message at a time), and a cache keeps the last few shapes, since each
holds its workspace on the GPU (encode about 8x the carry's bf16 bytes, decode about 3x).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings

import torch

from . import gpu_kernels as K
from .entropy import ALPHABET, Geometry
from .gpu_layout import N_BUCKETS, N_CLASSES, Layout, aligned

log = logging.getLogger(__name__)


def encode(x: torch.Tensor, layout: Layout, settings, reference: dict | None, keep: bool) -> dict | None:
    """Encode (B, T, C) `x` with the fused kernels: through a captured graph on CUDA (with
    settings.graphs), else launched one by one. -> as gpu_kernels.finish_encode."""
    K.mark("start")
    p = layout
    inputs = K.Inputs.of(x, p, reference)
    if settings.graphs and x.is_cuda:
        graph = _encode_graph(x, p, settings, reference is not None, keep)
        with graph.lock:  # its buffers serve one message at a time
            dev, meta = graph.run(x, inputs)
            K.mark("sizes")
            return K.finish_encode(dev, meta, p, reference is not None, keep, captured=True)
    dev = K.launch_encode(x, p, settings, inputs, keep)
    K.mark("queued")
    meta = dev["meta"].cpu()
    K.mark("sizes")
    return K.finish_encode(dev, meta, p, reference is not None, keep, captured=False)


class EncodeGraph:
    """One carry shape's encode (key or delta, keeping a reference or not) as a graph.
    The carry, and for a delta the stream's reference, are copied into its own buffers;
    `run` leaves the outputs in its own buffers for finish_encode, under `lock`."""

    def __init__(self, x: torch.Tensor, p: Layout, settings, delta: bool, keep: bool):
        device = x.device
        self.x = torch.empty_like(x)
        self.x.copy_(x)
        self.inputs = K.Inputs()
        if delta:
            cap = max(p.loud_capacity, 1)
            self.inputs = K.Inputs(torch.zeros(p.channels, device=device),
                                   torch.full((cap,), -1, dtype=torch.int64, device=device),
                                   torch.zeros((), dtype=torch.int64, device=device),
                                   torch.zeros((p.fixed_rows + p.loud_capacity) * p.channels, device=device))
        self.lock = threading.Lock()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            K.launch_encode(self.x, p, settings, self.inputs, keep)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # other threads may run
            self.out = K.launch_encode(self.x, p, settings, self.inputs, keep)
        self.meta = torch.empty(self.out["meta"].numel(), dtype=torch.int64, pin_memory=True)

    def run(self, x: torch.Tensor, inputs: K.Inputs) -> tuple[dict, torch.Tensor]:
        self.x.copy_(x)
        if inputs.ref is not None:
            mine = self.inputs
            mine.center.copy_(inputs.center)
            mine.loud_idx.fill_(-1)
            mine.loud_idx[: inputs.loud_idx.numel()].copy_(inputs.loud_idx)
            mine.n_loud.copy_(inputs.n_loud)
            mine.ref[: inputs.ref.numel()].copy_(inputs.ref)
        self.graph.replay()
        K.mark("queued")
        self.meta.copy_(self.out["meta"], non_blocking=True)
        torch.cuda.current_stream(x.device).synchronize()
        return self.out, self.meta


_GRAPHS: dict = {}
_DECODE_GRAPHS: dict = {}
_CACHE_LOCK = threading.Lock()  # the caches are shared by every codec instance and thread
MAX_GRAPHS = 4  # captured shapes kept per cache (each holds its workspace: ~8x the carry's bytes)


def _cached(cache: dict, key: tuple, make, what: str):
    """The cache's graph for `key`, made on first use; the least recently used goes.
    Making one compiles the kernels the first time on a machine (Triton keeps them on
    disk after): up to about a minute, so it is logged."""
    with _CACHE_LOCK:
        graph = cache.pop(key, None)
        if graph is None:
            started = time.perf_counter()
            log.info("gpu codec: preparing the %s graph (the first time on a machine compiles its kernels, "
                     "up to about a minute)", what)
            graph = make()
            log.info("gpu codec: %s graph ready in %.1f s", what, time.perf_counter() - started)
            while len(cache) >= MAX_GRAPHS:
                cache.pop(next(iter(cache)))
        cache[key] = graph  # most recent last
        return graph


def _encode_graph(x: torch.Tensor, p: Layout, settings, delta: bool, keep: bool) -> EncodeGraph:
    key = (str(x.device), x.dtype, p.batch, p.tokens, p.channels, p.n_txt, p.h, p.w, settings, delta, keep)
    what = f"{'delta' if delta else 'key'} encode {tuple(x.shape)}"
    return _cached(_GRAPHS, key, lambda: EncodeGraph(x, p, settings, delta, keep), what)


GRAPH_ESCAPES = 4096  # escapes a captured decoder has room for (more: the launched path)


class DecodeGraph:
    """One message shape's decode as a graph. Its buffers: a pinned host staging area and
    a device copy of it, each part at a fixed offset and the words last (their count
    varies), so one upload of the used prefix feeds every replay."""

    def __init__(self, spec: dict, p: Layout, geo: Geometry, out_dtype, delta: bool, keep: bool, device):
        self.spec, self.p, self.geo, self.delta, self.keep = spec, p, geo, delta, keep
        self.offsets, at = {}, 0
        for name, (nbytes, dtype) in spec.items():
            self.offsets[name] = at
            at += aligned(nbytes)
        self.capacity = at
        self.host = torch.zeros(at, dtype=torch.uint8, pin_memory=True)
        self.blob = torch.zeros(at, dtype=torch.uint8, device=device)
        self.center = torch.zeros(p.channels, device=device)
        self.ref = torch.zeros(p.n_coef, device=device) if delta else None
        self.lock = threading.Lock()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            self._decode(out_dtype)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # other threads may run
            self.out, self.new_ref, self.bad, self.used_center = self._decode(out_dtype)

    def _view(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        at = self.offsets[name]
        nbytes, dtype = self.spec[name]
        return tensor[at:at + nbytes].view(dtype)

    def _decode(self, out_dtype):
        pieces = {name: self._view(self.blob, name) for name in self.spec}
        tables = pieces.pop("tables")
        freq = torch.zeros(N_BUCKETS, ALPHABET, dtype=torch.int64, device=self.blob.device)
        freq[tables] = pieces["freq"].to(torch.int64).view(tables.numel(), ALPHABET)
        pieces["freq"] = freq
        pieces["buckets"] = pieces["buckets"].view(N_CLASSES, self.p.channels)
        pieces["states"] = pieces["states"].view(self.geo.groups, self.geo.lanes)
        center = self.center if self.delta else pieces["center"].float()
        return (*K.decode(pieces, self.p, self.geo, center, self.ref, self.keep, out_dtype), center)

    def run(self, frames: dict, center: torch.Tensor | None, reference: torch.Tensor | None):
        """`frames`: part name -> bytes-like (the message's buffers, and the small arrays
        the header gives). -> (output, new reference or None, the centre, corrupt?); the
        outputs are copies: the next replay overwrites the graph's own."""
        for name, frame in frames.items():
            n = memoryview(frame).nbytes
            if n:
                with warnings.catch_warnings():  # read-only bytes: torch warns, and only reads them
                    warnings.simplefilter("ignore", UserWarning)
                    source = torch.frombuffer(frame, dtype=torch.uint8)
                at = self.offsets[name]
                self.host[at:at + n].copy_(source)
        used = self.offsets["words"] + memoryview(frames["words"]).nbytes
        self.blob[:used].copy_(self.host[:used], non_blocking=True)
        if self.delta:
            self.center.copy_(center)
            self.ref.copy_(reference)
        self.graph.replay()
        out = self.out.clone()
        new_ref, center = (self.new_ref.clone(), self.used_center.clone()) if self.keep else (None, None)
        return out, new_ref, center, bool(self.bad.item())


def decode_captured(frames: dict, spec: dict, p: Layout, geo: Geometry, out_dtype, delta: bool, keep: bool,
                    center, reference, device) -> tuple:
    """Decode through a captured graph for this message shape (made on first use)."""
    key = (str(device), tuple(spec.items()), p.batch, p.tokens, p.channels, p.n_txt, p.h, p.w, len(p.loud),
           geo.lanes, geo.steps, geo.groups, out_dtype, delta, keep)
    what = f"{'delta' if delta else 'key'} decode {(p.batch, p.tokens, p.channels)}"
    graph = _cached(_DECODE_GRAPHS, key, lambda: DecodeGraph(spec, p, geo, out_dtype, delta, keep, device), what)
    with graph.lock:  # its buffers serve one message at a time
        return graph.run(frames, center, reference)
