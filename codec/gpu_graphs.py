"""CUDA graphs for the `gpu` codec's fused kernels (codec/gpu_kernels.py): one per shape.

Launched one by one from Python, an encode's ~70 kernels cost 3.7 ms of host time on an
H200 against 1.3 ms of GPU time, and a decode's ~45 cost about twice its GPU time. A
captured graph replays them in one call. Its kernels reach the tensors that change from
call to call (the carry, the stream's reference, the output and the new reference)
through an AddressTable, not through copies into and out of buffers of the graph's own;
the small inputs are copied in and the small outputs copied out before the next replay
(a lock per graph keeps to one message at a time). A cache keeps the last few shapes,
since each holds its workspace on the GPU (the symbols, word buffers and message of an
encode, the int16 values of a decode: a few times the carry's bf16 bytes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings

import torch

from . import gpu_kernels as K
from .entropy import Geometry
from .gpu_layout import N_CLASSES, REF_DTYPE, Layout, aligned

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


class AddressTable:
    """The addresses of the tensors a captured graph reads or writes that change from call
    to call (the caller's reference, fresh outputs), in a device array its kernels read
    when they run (gpu_kernels._through): no copy of those tensors in or out of the
    graph's own buffers. A delta decode copied 0.24 GB a message that way: the reference
    in, the output and the new reference out."""

    SLOTS = ("x", "ref", "new_ref", "out")  # gpu_kernels.SLOT_X, SLOT_REF, ...

    def __init__(self, device):
        self.host = torch.zeros(len(self.SLOTS), dtype=torch.int64, pin_memory=True)
        self.device = torch.zeros(len(self.SLOTS), dtype=torch.int64, device=device)

    def point(self, **tensors: torch.Tensor | None) -> tuple:
        """Each named slot <- its tensor's address (0 for None), on the current stream.
        The kernels take contiguous tensors starting on 16 bytes: others (a view into a
        larger buffer) are copied. -> the tensors pointed at, in the order given: the
        caller keeps them alive until the graph has run, and waits for it before pointing
        again (the host array is reused)."""
        held = []
        for name, t in tensors.items():
            if t is not None and (not t.is_contiguous() or t.data_ptr() % 16):
                t = t.clone(memory_format=torch.contiguous_format)
            self.host[self.SLOTS.index(name)] = 0 if t is None else t.data_ptr()
            held.append(t)
        self.device.copy_(self.host, non_blocking=True)
        return tuple(held)


class EncodeGraph:
    """One carry shape's encode (key or delta, keeping a reference or not) as a graph.
    The carry, the stream's reference (delta) and a fresh new reference (keep) are
    reached through an AddressTable, or where the carry is too small for that
    (K.takes_table), copied into and out of the graph's own buffers; the small inputs
    of a delta (centre, loud tokens) are copied in. `run` leaves the other outputs in the
    graph's own buffers for finish_encode, under `lock`."""

    def __init__(self, x: torch.Tensor, p: Layout, settings, delta: bool, keep: bool):
        self.device, self.keep = x.device, keep
        self.ref_numel = (p.fixed_rows + p.loud_capacity) * p.channels
        self.table = AddressTable(x.device) if K.takes_table(x) else None
        table = self.table.device if self.table is not None else None
        # without a table, the graph's own carry and reference; with one, x and the
        # reference below only give the shape and dtype, and say there is a reference
        self.x = torch.empty_like(x) if table is None else x
        self.inputs = K.Inputs()
        if delta:
            cap = max(p.loud_capacity, 1)
            self.inputs = K.Inputs(torch.zeros(p.channels, device=x.device),
                                   torch.full((cap,), -1, dtype=torch.int64, device=x.device),
                                   torch.zeros((), dtype=torch.int64, device=x.device),
                                   torch.zeros(self.ref_numel if table is None else 1, dtype=REF_DTYPE,
                                               device=x.device))
        self.lock = threading.Lock()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # compile and warm up outside the capture, on stand-ins
            if table is None:
                self.x.copy_(x)
            else:  # (held until the warm-up has run: the kernels write into them)
                stand_ins = self.table.point(x=x, ref=torch.zeros(self.ref_numel, dtype=REF_DTYPE, device=x.device)
                                             if delta else None, new_ref=self._new_ref())
            K.launch_encode(self.x, p, settings, self.inputs, keep, table)
            side.synchronize()
            stand_ins = None
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # other threads may run
            self.out = K.launch_encode(self.x, p, settings, self.inputs, keep, table)
        if table is not None:
            self.x = None  # the caller's first carry: not kept
        self.meta = torch.empty(self.out["meta"].numel(), dtype=torch.int64, pin_memory=True)

    def _new_ref(self) -> torch.Tensor | None:
        return torch.empty(self.ref_numel, dtype=REF_DTYPE, device=self.device) if self.keep else None

    def run(self, x: torch.Tensor, inputs: K.Inputs) -> tuple[dict, torch.Tensor]:
        mine, out = self.inputs, self.out
        if inputs.ref is not None:
            mine.center.copy_(inputs.center)
            mine.loud_idx.fill_(-1)
            mine.loud_idx[: inputs.loud_idx.numel()].copy_(inputs.loud_idx)
            mine.n_loud.copy_(inputs.n_loud)
        if self.table is None:
            self.x.copy_(x)
            if inputs.ref is not None:
                mine.ref[: inputs.ref.numel()].copy_(inputs.ref)
        else:
            # (the kernels read only the rows the reference has: its loud rows are counted)
            held = self.table.point(x=x, ref=None if inputs.ref is None else inputs.ref.to(REF_DTYPE),
                                    new_ref=self._new_ref())
            out = dict(out, new_ref=held[2], fresh_ref=True)
        self.graph.replay()
        K.mark("queued")
        self.meta.copy_(self.out["meta"], non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # (the table is free again)
        return out, self.meta


_GRAPHS: dict = {}
_DECODE_GRAPHS: dict = {}
_CACHE_LOCK = threading.Lock()  # the caches are shared by every codec instance and thread
MAX_GRAPHS = 4  # captured shapes kept per cache (each holds its workspace: a few times the carry's bytes)


@contextlib.contextmanager
def dropped_after():
    """Graphs made inside the block leave the caches at its end (a warm-up: it compiles
    their kernels, and keeps no workspace for its small shape)."""
    with _CACHE_LOCK:
        before = [set(cache) for cache in (_GRAPHS, _DECODE_GRAPHS)]
    try:
        yield
    finally:
        with _CACHE_LOCK:
            for cache, keys in zip((_GRAPHS, _DECODE_GRAPHS), before):
                for key in [k for k in cache if k not in keys]:
                    del cache[key]


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
    varies), so one upload of the used prefix feeds every replay. The stream's reference,
    the output and the new reference are the caller's and fresh tensors, reached through
    an AddressTable."""

    def __init__(self, spec: dict, p: Layout, geo: Geometry, out_dtype, delta: bool, keep: bool, device):
        self.spec, self.p, self.geo, self.delta, self.keep = spec, p, geo, delta, keep
        self.out_dtype = out_dtype
        self.offsets, at = {}, 0
        for name, (nbytes, dtype) in spec.items():
            self.offsets[name] = at
            at += aligned(nbytes)
        self.capacity = at
        self.host = torch.zeros(at, dtype=torch.uint8, pin_memory=True)
        self.blob = torch.zeros(at, dtype=torch.uint8, device=device)
        self.center = torch.zeros(p.channels, device=device)
        self.table = AddressTable(device)
        self.lock = threading.Lock()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile and warm up outside the capture, on stand-ins
            new_ref, out = self._outputs()
            stand_ins = self.table.point(ref=torch.zeros(p.n_coef, dtype=REF_DTYPE, device=device) if delta else None,
                                         new_ref=new_ref, out=out)
            self._decode()
            side.synchronize()
            del stand_ins, new_ref, out
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # other threads may run
            self.bad, self.used_center = self._decode()

    def _outputs(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Fresh (new reference or None, output) for one replay."""
        p, device = self.p, self.blob.device
        new_ref = torch.empty(p.n_coef, dtype=REF_DTYPE, device=device) if self.keep else None
        return new_ref, torch.empty(p.batch * p.tokens, p.channels, dtype=self.out_dtype, device=device)

    def _view(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        at = self.offsets[name]
        nbytes, dtype = self.spec[name]
        return tensor[at:at + nbytes].view(dtype)

    def _decode(self):
        pieces = {name: self._view(self.blob, name) for name in self.spec}
        pieces["buckets"] = pieces["buckets"].view(N_CLASSES, self.p.channels)
        pieces["states"] = pieces["states"].view(self.geo.groups, self.geo.lanes)
        center = self.center if self.delta else pieces["center_f32"]
        # the reference argument only says there is one: the kernel reads it through the table
        _, _, bad = K.decode(pieces, self.p, self.geo, center, self.center if self.delta else None, self.keep,
                             self.out_dtype, table=self.table.device)
        return bad, center

    def run(self, frames: dict, center: torch.Tensor | None, reference: torch.Tensor | None):
        """`frames`: part name -> bytes-like (the message's buffers, and the small arrays
        the header gives). -> (output, new reference or None, the centre, corrupt?): the
        output and the new reference are fresh tensors the kernels wrote through the
        table, the centre a copy (the next replay overwrites the graph's own)."""
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
            if reference.numel() != self.p.n_coef:
                raise ValueError("the stream's reference does not fit this message")
        new_ref, out = self._outputs()
        # (held until it ran)
        held = self.table.point(ref=reference.to(REF_DTYPE) if self.delta else None, new_ref=new_ref, out=out)
        self.graph.replay()
        center = self.used_center.clone() if self.keep else None
        return out, new_ref, center, bool(self.bad.item())  # (waits for the graph: `held` may go)


def decode_captured(frames: dict, spec: dict, p: Layout, geo: Geometry, out_dtype, delta: bool, keep: bool,
                    center, reference, device) -> tuple:
    """Decode through a captured graph for this message shape (made on first use)."""
    key = (str(device), tuple(spec.items()), p.batch, p.tokens, p.channels, p.n_txt, p.h, p.w, len(p.loud),
           geo.lanes, geo.steps, geo.groups, out_dtype, delta, keep)
    what = f"{'delta' if delta else 'key'} decode {(p.batch, p.tokens, p.channels)}"
    graph = _cached(_DECODE_GRAPHS, key, lambda: DecodeGraph(spec, p, geo, out_dtype, delta, keep, device), what)
    with graph.lock:  # its buffers serve one message at a time
        return graph.run(frames, center, reference)
