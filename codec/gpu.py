"""The `gpu` codec: transform, uniform quantisation and context-modelled rANS, on-device.

For cards without NVENC (H100, H200, AMD, CPU). Every stage runs where the tensor is;
the only host transfers are the final bytes, one copy each way, and on encode one small
copy of their sizes. Two backends write and read the same messages:
codec/gpu_kernels.py (fused Triton kernels, run as CUDA graphs by codec/gpu_graphs.py)
and codec/gpu_reference.py (torch ops, anywhere; its docstring walks through the
pipeline). codec/gpu_layout.py says where each coefficient comes from.

Error: every coefficient is off by at most step/2 (escapes are exact), the transform
is orthonormal, so ||error|| <= step/2 * sqrt(N): the header states this bound.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import gpu_graphs, gpu_kernels, gpu_reference
from .base import CodecError, CodecStateError, EncodedTensor, StreamState, TokenLayout
from .checks import check_codec_and_version, dtype_name, header_dtype, header_field, header_shape, message_parts
from .entropy import ALPHABET, PROB_SCALE, Geometry
from .gpu_layout import (ALIGN, FINEST_STEP, N_BUCKETS, N_CLASSES, PRED_MAX, Layout, aligned, bf16_as_float32,
                         make_layout)

# 3: the temporal reference is bf16 (gpu_layout.REF_DTYPE); a delta from version 2 meant
# a float32 one, and the two ends would drift apart. 4: a delta codes the change from the
# reference times a weight its header gives ("pred", gpu_layout.prediction_weight); a
# version 3 delta meant weight 1. 5: each channel's step travels as a bf16 value
# ("steps", gpu_layout.channel_floors), where version 4 sent a power-of-two shift of the
# global step ("shifts").
FORMAT_VERSION = 5


@dataclass(frozen=True)
class GpuSettings:
    """Encoder settings; a decoder reads what it needs from the message (only `backend`
    and `graphs` apply to decoding too)."""

    #: target relative L2 error of the whole tensor; the step size follows from it.
    #: Unit: ||error|| / ||x||. The header states a hard bound (about 1.7x this).
    rel_err: float = 0.03
    #: the most relative error any one channel should get (its own RMS error over its
    #: robust spread): quiet channels, which one global step would zero out, get a step of
    #: their own, sized as if every coefficient erred by a uniform step/sqrt(12). Those
    #: near half a step err more (rounded to zero): on the corpus (768 channels) the worst
    #: channel's cosine was 0.952 at 0.2 (0.917 at 0.25, 0.983 at 0.15). 0 turns this off
    #: (pure rate-optimal allocation). Unit: ratio.
    channel_rel_err: float = 0.2
    #: use the grid of image tokens (from the TokenLayout hint) for an 8x8 DCT.
    transform: bool = True
    #: code the change from the previous message when a StreamState is given.
    temporal: bool = True
    #: rANS lanes per group (a power of two; 32 = one GPU warp), and at least / at most
    #: this many steps per lane (the encoder picks; the header records it). More steps:
    #: smaller final-state overhead (4 bytes a lane: 2 % of the ratio at 256 steps);
    #: fewer: more lanes in parallel (on an H200, rANS decode of 28 M symbols took
    #: 0.43 ms at 256 steps, 1.0 ms at 1024).
    lanes: int = 32
    min_steps: int = 256
    max_steps: int = 4096
    #: "auto": the fused Triton kernels on a CUDA device, torch ops elsewhere; "torch"
    #: forces the reference backend, "triton" the kernels (Triton's interpreter runs them
    #: on a CPU, slowly: tests). Both write and read the same messages.
    backend: str = "auto"
    #: the fused encoder and decoder run as a CUDA graph per shape (codec/gpu_graphs.py):
    #: launching an encode's ~70 kernels one by one cost 3.7 ms of host time on an H200
    #: against 1.3 ms of GPU time. Each captured shape keeps its workspace on the GPU
    #: (a few times the carry's bf16 bytes); up to four shapes each.
    #: Off: launch every kernel each time.
    graphs: bool = True

    def steps_for(self, delta: bool) -> int:
        """Steps per lane for a message: twice as many for a delta message, which codes
        fewer bits per symbol, so the same 4-byte final states weigh more (at 256 steps
        they were 8 % of a delta message at rho 0.9, against 5 % of a key message)."""
        return min(self.max_steps, self.min_steps * (2 if delta else 1))

    def __post_init__(self):
        if not (isinstance(self.rel_err, (int, float)) and 0 < self.rel_err < 1):
            raise CodecError(f"gpu codec rel_err must be in (0, 1), got {self.rel_err!r}")
        if not (isinstance(self.lanes, int) and 1 <= self.lanes <= 1024 and self.lanes & (self.lanes - 1) == 0):
            raise CodecError(f"gpu codec lanes must be a power of two in [1, 1024], got {self.lanes!r}")
        if not (isinstance(self.channel_rel_err, (int, float)) and 0 <= self.channel_rel_err < math.inf):
            raise CodecError(f"gpu codec channel_rel_err must be a number >= 0, got {self.channel_rel_err!r}")
        for name in ("transform", "temporal", "graphs"):
            if not isinstance(getattr(self, name), bool):
                raise CodecError(f"gpu codec {name} must be true or false, got {getattr(self, name)!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise CodecError(f"gpu codec backend must be auto, torch or triton, got {self.backend!r}")
        if not (isinstance(self.max_steps, int) and isinstance(self.min_steps, int)
                and 1 <= self.min_steps <= self.max_steps <= 65536):
            raise CodecError(f"gpu codec steps need 1 <= min_steps <= max_steps <= 65536, got "
                             f"{self.min_steps!r}, {self.max_steps!r}")


def _to_bytes(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Concatenate tensors' bytes on their device; one host copy of the result, into
    pinned memory from a GPU (a pageable copy of 8 MB measured 3.8 ms on an H200)."""
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    sizes = [f.numel() for f in flat]
    blob = torch.cat(flat)
    if not blob.is_cuda:
        return blob, sizes
    host = torch.empty(blob.numel(), dtype=torch.uint8, pin_memory=True)
    host.copy_(blob)
    return host, sizes


def _check_small_parts(frames: dict, words_bytes: int, n_coef: int, step: float) -> None:
    """The parts that steer the decoder, checked on the host before anything reaches a
    kernel (they are small; the word stream itself is checked as it decodes): a corrupt
    count would otherwise point the decoder's reads outside its stream."""
    group_words = np.frombuffer(frames["group_words"], dtype=np.int32)
    if (group_words < 0).any() or int(group_words.sum(dtype=np.int64)) != words_bytes // 2:
        raise CodecError("gpu codec word counts do not match the word stream: truncated or corrupt")
    freq = np.frombuffer(frames["freq"], dtype=np.int16).reshape(-1, ALPHABET)
    totals = freq.sum(axis=1, dtype=np.int64)
    if (freq < 0).any() or ((totals != 0) & (totals != PROB_SCALE)).any():
        raise CodecError("gpu codec frequency tables are corrupt")
    steps = bf16_as_float32(frames["steps"])
    # a channel's step is the global one or finer, down to FINEST_STEP of it (gpu_layout.channel_steps)
    if not ((steps <= np.float32(step)) & (steps >= np.float32(step) * np.float32(FINEST_STEP))).all() or \
            (np.frombuffer(frames["buckets"], dtype=np.uint8) >= N_BUCKETS).any():
        raise CodecError("gpu codec context or step buffers are corrupt")
    esc_pos = np.frombuffer(frames["esc_pos"], dtype=np.int64)
    if ((esc_pos < 0) | (esc_pos >= n_coef)).any():
        raise CodecError("gpu codec escape positions point outside the tensor")
    if (esc_pos[1:] <= esc_pos[:-1]).any():  # the fused decoder reads each tile's as a run of the list
        raise CodecError("gpu codec escape positions are not in ascending order")
    if not np.isfinite(np.frombuffer(frames["esc_val"], dtype=np.float32)).all():
        raise CodecError("gpu codec escape values are not finite")


def _assemble(parts: dict, tables: list, delta: bool) -> tuple[list, list]:
    """The torch backend's parts as message buffers (names, memoryviews): one host copy."""
    names = ["steps", "buckets", "freq", "group_words", "states", "words", "esc_pos", "esc_val"]
    payload = [parts["steps"], parts["buckets"], parts["freq"][tables].to(torch.int16), parts["group_words"],
               parts["states"], parts["words"], parts["esc_pos"], parts["esc_val"]]
    if not delta:
        names.insert(0, "center")
        payload.insert(0, parts["center"].to(torch.bfloat16))
    blob, sizes = _to_bytes(payload)
    view = memoryview(blob.numpy())
    buffers, pos = [], 0
    for size in sizes:
        buffers.append(view[pos:pos + size])
        pos += size
    return names, buffers


def _upload(chunks: list, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Buffers (received bytes or small arrays) into one tensor on `device`, each at an
    ALIGN-ed offset so typed views need no copies: one host copy (into pinned memory for
    a GPU), one upload. Received buffers are read-only, so the host copy is owed anyway."""
    sizes = [memoryview(c).nbytes for c in chunks]
    offsets = np.cumsum([0] + [aligned(n) for n in sizes]).tolist()
    host = torch.empty(max(offsets[-1], ALIGN), dtype=torch.uint8, pin_memory=device.type == "cuda")
    for chunk, at, end, n in zip(chunks, offsets, offsets[1:], sizes):
        if n:
            with warnings.catch_warnings():  # read-only bytes: torch warns, and only reads them
                warnings.simplefilter("ignore", UserWarning)
                source = torch.frombuffer(chunk, dtype=torch.uint8)
            host[at:at + n].copy_(source)  # torch copies in parallel; numpy took ~0.9 ms for 8 MB
        host[at + n:end] = 0  # only the padding: zeroing 8 MB of pinned memory took 1.3 ms
    blob = host.to(device, non_blocking=True) if device.type == "cuda" else host
    return blob, offsets


def _torch_dtype(arr: np.ndarray) -> torch.dtype:
    """The torch dtype of a numpy array's (some are read-only: torch.from_numpy warns)."""
    return torch.from_numpy(np.empty(0, dtype=arr.dtype)).dtype


def _fused(settings: GpuSettings, device: torch.device) -> bool:
    if settings.backend == "auto":
        return gpu_kernels.available(device)
    if settings.backend == "triton" and gpu_kernels.triton is None:
        raise CodecError("gpu codec backend 'triton' needs the triton package (CUDA builds of torch bring it)")
    return settings.backend == "triton"


_PART_TYPES = {"center": torch.bfloat16, "steps": torch.bfloat16, "buckets": torch.uint8, "freq": torch.int16,
               "group_words": torch.int32, "states": torch.int32, "words": torch.int16, "esc_pos": torch.int64,
               "esc_val": torch.float32}


class GpuCodec:
    name = "gpu"
    Settings = GpuSettings
    format_version = FORMAT_VERSION

    def __init__(self, settings: GpuSettings | None = None):
        self.settings = settings or GpuSettings()

    def warm_up(self, channels: int, device, dtype: torch.dtype = torch.bfloat16) -> float | None:
        """Do the fused backend's first-use work now: Triton compiles its kernels the first
        time a process meets a channel count (about 50 s on a fresh H200; on a fresh H100
        with the captured graphs' variants too, warming up and then coding two messages
        took 73 s; then from Triton's disk cache, about a second), which would otherwise
        land inside the first sampler step. Codes a small carry of `channels`, a key
        message and a delta against it, both ways, launched and captured. -> seconds
        spent, or None where the kernels do not run (no CUDA device or no Triton: nothing
        to compile)."""
        device = torch.device(device)
        if not _fused(self.settings, device) or device.type != "cuda":
            return None
        t0 = time.perf_counter()
        # Launched and captured: a captured graph's kernels read the carry and write their
        # outputs through an address table, a variant of each kernel of its own. The graphs
        # of this small shape go again: they would only take a place in the graph caches.
        layout = TokenLayout(n_txt=64, h=16, w=16)
        g = torch.Generator(device=device).manual_seed(0)
        with gpu_graphs.dropped_after():
            for graphs in (False, True) if self.settings.graphs else (False,):
                codec = GpuCodec(replace(self.settings, graphs=graphs))
                sent, received = StreamState(), StreamState()
                for _ in range(2):  # a key message, then a delta
                    x = torch.randn(1, 64 + 16 * 16, channels, generator=g, device=device).to(dtype)
                    codec.decode(codec.encode(x, state=sent, layout=layout), device, state=received)
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- encode

    def encode(self, tensor: torch.Tensor, *, state: StreamState | None = None,
               layout: TokenLayout | None = None) -> EncodedTensor:
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"codecs encode torch tensors, not {type(tensor).__name__}")
        dtype = dtype_name(tensor.dtype)
        s = self.settings
        shape = tuple(tensor.shape)
        p = make_layout(shape, layout, s.transform)
        x = tensor.detach().reshape(p.batch, p.tokens, p.channels)
        temporal = s.temporal and state is not None
        delta = temporal and state.reference is not None and p.same_shape(state.signature)
        reference = state.reference if delta else None
        if delta:
            p = state.signature  # keep the reference's loud tokens, so the delta lines up
        parts = None
        if _fused(s, x.device) and x.numel():
            parts = gpu_graphs.encode(x.contiguous(), p, s, reference, temporal)
        if parts is None:  # no kernels here, or more escapes than the kernels collect
            parts = gpu_reference.encode(x, p, s, reference, temporal)
        p, geo, step, norm, used = parts["layout"], parts["geo"], parts["step"], parts["norm"], parts["tables"]
        if "buffers" in parts:  # the fused backend packs the message itself
            names = [n for n in _PART_TYPES if n in parts["buffers"]]
            buffers = [parts["buffers"][n] for n in names]
            n_esc = parts["n_esc"]
        else:
            names, buffers = _assemble(parts, used, delta)
            n_esc = int(parts["esc_pos"].numel())
        sizes = [memoryview(b).nbytes for b in buffers]
        bound = (step / 2 * math.sqrt(p.n_coef) / norm if norm > 0 else 0.0) + 1e-5
        if tensor.dtype in (torch.bfloat16, torch.float16):
            bound += (2.0 ** -8 if tensor.dtype == torch.bfloat16 else 2.0 ** -11) * (1 + bound)
        header = {
            "codec": self.name, "v": FORMAT_VERSION, "shape": list(shape), "dtype": dtype,
            "grid": [p.n_txt, p.h, p.w], "loud": list(p.loud), "step": step, "n": math.prod(shape),
            "rans": [geo.lanes, geo.steps, geo.groups], "parts": dict(zip(names, sizes)),
            "n_esc": n_esc, "tables": used, "rel_err_bound": bound,
        }
        if delta:
            header["pred"] = parts["pred"]
        if temporal:
            state.reference, state.signature = parts["reference"], p
            header["stream"] = {"seq": state.seq + 1, "delta": bool(delta), "ref": state.seq if delta else None}
            state.seq += 1
        return EncodedTensor(header, buffers)

    # ---------------------------------------------------------------- decode

    def decode(self, message: EncodedTensor, device: torch.device | str | None = None, *,
               state: StreamState | None = None) -> torch.Tensor:
        header, buffers = message_parts(message)
        check_codec_and_version(header, self.name, FORMAT_VERSION)
        shape = header_shape(header)
        out_dtype = header_dtype(header)
        try:
            n_txt, h, w = (int(v) for v in header_field(header, "grid", list))
            lanes, steps, groups = (int(v) for v in header_field(header, "rans", list))
            step = float(header_field(header, "step", (int, float)))
            parts = header_field(header, "parts", dict)
            n_esc = int(header_field(header, "n_esc", int))
        except (TypeError, ValueError):
            raise CodecError("gpu codec header has malformed grid/rans/step/parts/n_esc fields") from None
        stream = header.get("stream")
        delta = bool(stream and stream.get("delta"))
        names = (["center"] if not delta else []) + ["steps", "buckets", "freq", "group_words", "states", "words",
                                                      "esc_pos", "esc_val"]
        if sorted(parts) != sorted(names) or len(buffers) != len(names):
            raise CodecError(f"gpu codec message needs {len(names)} buffers {names}, got {len(buffers)}")
        if n_txt < 0 or h < 0 or w < 0:
            raise CodecError(f"gpu codec grid {[n_txt, h, w]} has negative sizes")
        if not (math.isfinite(step) and step > 0):
            raise CodecError(f"gpu codec step size {step!r} is not a positive number")
        p = make_layout(shape, TokenLayout(n_txt, h, w) if h else None, True)
        loud = header.get("loud", [])
        if not (isinstance(loud, list) and all(isinstance(i, int) and 0 <= i < p.image_tokens for i in loud)
                and loud == sorted(set(loud)) and len(loud) <= max(p.loud_capacity, 0)):
            raise CodecError("gpu codec header lists impossible loud tokens")
        p = Layout(p.batch, p.tokens, p.channels, p.n_txt, p.h, p.w, tuple(loud))
        if (not h and n_txt != p.tokens) or (h and p.n_txt != n_txt):
            raise CodecError(f"gpu codec grid {[n_txt, h, w]} does not fit shape {shape}")
        geo = Geometry(p.n_coef, lanes, steps, groups)
        # An encoder sizes the geometry for the most loud rows (the fused one sends the
        # groups past the actual rows too: they are empty). Anything larger is refused:
        # steps compile into the kernels, and offsets must stay in int32.
        most = max((p.fixed_rows + p.loud_capacity) * p.channels, 1)
        if not (1 <= lanes <= 1024 and lanes & (lanes - 1) == 0 and 1 <= steps <= min(65536, -(-most // lanes))
                and 1 <= groups <= -(-most // (steps * lanes)) and geo.n <= geo.padded < 2 ** 31):
            raise CodecError(f"gpu codec rANS geometry {lanes}x{steps}x{groups} does not fit {geo.n} symbols")
        pred = header.get("pred") if delta else 1.0
        if not (isinstance(pred, (int, float)) and not isinstance(pred, bool) and 0 <= pred <= PRED_MAX):
            raise CodecError(f"gpu codec delta weight {pred!r} is not a number in [0, {PRED_MAX}]")
        if delta and (state is None or state.reference is None or state.signature != p or
                      stream.get("ref") != state.seq):
            have = None if state is None else state.seq
            raise CodecStateError(f"delta message refers to message {stream.get('ref')}, this end has "
                                  f"{have}: reset the stream and send a key message")
        tables = header.get("tables")
        if not (isinstance(tables, list) and all(isinstance(t, int) and 0 <= t < N_BUCKETS for t in tables)
                and len(set(tables)) == len(tables)):
            raise CodecError("gpu codec header lists impossible context tables")
        sizes = {name: memoryview(b).nbytes for name, b in zip(names, buffers)}
        expected = {"center": p.channels * 2, "steps": p.channels * 2, "buckets": N_CLASSES * p.channels,
                    "freq": len(tables) * ALPHABET * 2, "group_words": groups * 4, "states": groups * lanes * 4,
                    "esc_pos": n_esc * 8, "esc_val": n_esc * 4}
        for name, size in expected.items():
            if name in sizes and sizes[name] != size:
                raise CodecError(f"gpu codec buffer {name!r} has {sizes[name]} bytes, expected {size}")
        if sizes["words"] % 2:
            raise CodecError("gpu codec word stream has an odd number of bytes: truncated or corrupt")
        _check_small_parts(dict(zip(names, buffers)), sizes["words"], p.n_coef, step)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        fused = _fused(self.settings, dev)
        if fused:  # the small inputs the kernels take, made here, go up with the message
            extras = gpu_kernels.decoder_inputs(p, dict(zip(names, buffers)), tables, n_esc, sizes["words"] // 2,
                                                pred)
        else:
            extras = {"tables": np.array(tables or [0], dtype=np.int64)}  # where the tables go (below)
        keep = state is not None and bool(stream)
        if (fused and dev.type == "cuda" and self.settings.graphs and tables
                and n_esc <= gpu_graphs.GRAPH_ESCAPES and sizes["words"] <= 4 * geo.padded):
            return self._decode_captured(buffers, names, sizes, extras, p, geo, out_dtype, delta, keep, state,
                                         stream, shape, dev)
        blob, offsets = _upload([buffers[names.index(n)] for n in names] + list(extras.values()), dev)
        pieces = {}
        for i, name in enumerate(names):
            pieces[name] = blob[offsets[i]:offsets[i] + sizes[name]].view(_PART_TYPES[name])
        for j, (name, arr) in enumerate(extras.items()):
            at = offsets[len(names) + j]
            pieces[name] = blob[at:at + arr.nbytes].view(_torch_dtype(arr))
        pieces["buckets"] = pieces["buckets"].view(N_CLASSES, p.channels)
        pieces["states"] = pieces["states"].view(groups, lanes)
        reference = state.reference["coef"] if delta else None
        if fused:
            center = state.reference["center"] if delta else pieces["center_f32"]
            if keep and not delta:  # the stream keeps it: not a view that holds the whole upload
                center = center.clone()
            x, new_ref, bad = gpu_kernels.decode(pieces, p, geo, center, reference, keep, out_dtype)
            if bool(bad.item()):
                raise CodecError("gpu codec message is corrupt: its tables, word stream or escapes do not add up")
        else:
            freq = torch.zeros(N_BUCKETS, ALPHABET, dtype=torch.int64, device=dev)
            if tables:
                freq[pieces["tables"]] = pieces["freq"].to(torch.int64).view(len(tables), ALPHABET)
            pieces["freq"] = freq
            pieces["pred"] = pred
            center = state.reference["center"] if delta else pieces["center"].float()
            x, new_ref = gpu_reference.decode(pieces, p, geo, center, reference, keep, out_dtype)
        if keep:
            state.reference, state.signature, state.seq = {"coef": new_ref, "center": center}, p, int(stream["seq"])
        return x.reshape(shape)

    def _decode_captured(self, buffers, names, sizes, extras, p, geo, out_dtype, delta, keep, state, stream, shape,
                         dev) -> torch.Tensor:
        """decode() through a captured graph of the fused kernels: the message's parts go
        to fixed places in the graph's own buffers (the words last, with room for the most
        a stream can have; escapes up to GRAPH_ESCAPES)."""
        frames = dict(zip(names, buffers))
        frames.update({name: arr.tobytes() for name, arr in extras.items()})
        spec = {name: (sizes[name], _PART_TYPES[name]) for name in names if name not in ("esc_pos", "esc_val", "words")}
        spec.update({name: (arr.nbytes, _torch_dtype(arr)) for name, arr in extras.items()})
        spec.update({"esc_pos": (8 * gpu_graphs.GRAPH_ESCAPES, torch.int64),
                     "esc_val": (4 * gpu_graphs.GRAPH_ESCAPES, torch.float32),
                     "words": (4 * geo.padded, torch.int16)})  # words last: the upload is one prefix
        center = state.reference["center"] if delta else None
        reference = state.reference["coef"] if delta else None
        x, new_ref, used_center, bad = gpu_graphs.decode_captured(frames, spec, p, geo, out_dtype, delta, keep,
                                                                   center, reference, dev)
        if bad:
            raise CodecError("gpu codec message is corrupt: its tables, word stream or escapes do not add up")
        if keep:
            state.reference, state.signature, state.seq = {"coef": new_ref, "center": used_center}, p, \
                int(stream["seq"])
        return x.reshape(shape)
