"""The `nvenc` codec: activations as HEVC video, encoded by NVENC through PyNvVideoCodec.

Same packing and the same message format as the `x265` codec (see x265.py): 8-bit 4:4:4
frames of token tiles, constant QP, every frame an IDR picture with its own VPS/SPS/PPS,
Annex-B. Only the encoder differs, so a receiver decodes an nvenc message with NVDEC where
it has one and with FFmpeg's software HEVC decoder (PyAV) where it has not.

Written against PyNvVideoCodec 2.2.4 (its wheel's Python, pybind docstrings and samples):

* `import PyNvVideoCodec` raises RuntimeError (not ImportError) where libnvidia-encode is
  missing, so it is imported lazily and any exception means "unavailable", with the
  reason. Where only the encode library is missing the decoder still works: the extension
  module is then loaded directly (`_decoder_module`), skipping the package's NVENC
  version check.
* `CreateEncoder(width, height, "YUV444", True, codec="hevc", rc="constqp",
  constqp="<qp>", gop="1", idrperiod="1", bf="0", repeatspspps="1", preset="P4",
  tuning_info=..., gpu_id="<n>")`: CPU input buffers of (3, H, W) uint8 (Y, U, V planes
  back to back). `Encode(array, flags)` and `EndEncode()` return lists of dicts whose
  'data' is one access unit. The SDK's encoder holds back a few frames, so every message
  ends with `EndEncode()` (a flush, as FFmpeg's nvenc flush does) and the session is reused
  for the next message; should a drained session refuse a frame, it is rebuilt once.
* Sessions (0.3-0.5 s to open on a consumer card) are cached per (frame size, QP, preset,
  tuning, GPU), at most `MAX_SESSIONS` (consumer drivers allow a handful of concurrent NVENC
  sessions), least recently used closed first; `close()` closes them, and so does an
  atexit hook, before the CUDA driver is torn down.
* `CreateDecoder(gpuid, codec=cudaVideoCodec.HEVC, usedevicememory=False,
  outputColorType=NATIVE, latency=DisplayDecodeLatencyType.LOW)`, fed one access unit per
  `PacketData` (bsl_data/bsl pointing at our bytes, decode_flag ENDOFPICTURE), output in
  host memory (Y, U, V planes), an end-of-stream packet if any frame is still held back.

Checked on an H200 (driver 580.159.04, CUDA 13, Python 3.12, PyNvVideoCodec 2.2.4; see
bench/nvdec_check.py): the decoder path returns frames identical byte for byte to FFmpeg's
software decoder for every 4:4:4 test stream (one to four frames, 144x144 to 4096x2304),
without an end-of-stream packet (so decoders are reused: ~6 ms for a 704x576 frame, ~66
ms for 4096x2304, after ~110 ms for the first); NVDEC refuses 4:0:0 ("gray", error 801),
so gray messages decode in software; `nvenc_capability()` reports error 2 from
nvEncOpenEncodeSessionEx. The encoder path itself could not run there (no NVENC): it is
exercised only against a stand-in module in tests/test_video_codec.py.

Capability is found by doing, never from NVML (H100/H200 report encoder capacity but
`nvEncOpenEncodeSessionEx` fails with error 2 there): `nvenc_capability()` opens a session
and encodes one frame; `nvdec_capability()` asks the decoder caps for HEVC 4:4:4 8-bit and
opens a decoder. Both are cached per process.

The error statement is the x265 codec's: the encoder decodes its own bitstream once (with
NVDEC where available, else in software) and states `rel_err_measured` and a hard
`rel_err_bound` for conforming decoders. `measure_error=False` skips that decode and states
only a loose a-priori bound (every code within 0..255).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib.util
import logging
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .base import CodecError
from .video_pack import Layout, check_frames
from .x265 import (
    HevcCodec,
    VideoSettings,
    _first_line,
    decode_hevc_software,
    software_decoder_capability,
)

log = logging.getLogger(__name__)

#: NVENC presets (P1 fastest .. P7 best).
NVENC_PRESETS = tuple(f"P{i}" for i in range(1, 8))
#: NVENC tuning (PyNvVideoCodec's names).
NVENC_TUNINGS = ("high_quality", "low_latency", "ultra_low_latency")
#: Open encoder sessions kept per codec instance.
MAX_SESSIONS = 2
#: NVDEC decoders kept per codec instance (one per frame size, oldest dropped first).
MAX_DECODERS = 4
#: NV_ENC_PIC_FLAG_FORCEIDR | NV_ENC_PIC_FLAG_OUTPUT_SPSPPS (nvEncodeAPI.h), used if the
#: module's enum cannot be read.
_FORCE_IDR_WITH_HEADERS = 0x2 | 0x4
#: cudaVideoChromaFormat_444 (nvcuvid.h).
_CHROMA_444 = 3


# --------------------------------------------------------------------------- loading PyNvVideoCodec


@functools.lru_cache(maxsize=None)
def _import_nvc() -> tuple[Any, str]:
    """(PyNvVideoCodec, "") or (None, why not). Any exception means unavailable."""
    try:
        import PyNvVideoCodec as nvc  # noqa: PLC0415 - optional, heavy, may raise RuntimeError
    except ModuleNotFoundError:
        return None, "PyNvVideoCodec is not installed (pip install 'comfy-mesh[nvenc]')"
    except Exception as exc:  # RuntimeError where libnvidia-encode is missing, OSError, ...
        return None, f"import PyNvVideoCodec failed ({_first_line(exc)})"
    return nvc, ""


@functools.lru_cache(maxsize=None)
def _decoder_module() -> tuple[Any, str]:
    """A module with PyNvVideoCodec's decoder API, or (None, why not).

    The package itself where it imports; else its extension module loaded directly, which
    needs libcuda and libnvcuvid but not libnvidia-encode (the package's __init__ checks
    the NVENC driver version first and fails without it).
    """
    nvc, reason = _import_nvc()
    if nvc is not None:
        return nvc, ""
    try:
        spec = importlib.util.find_spec("PyNvVideoCodec")
    except (ImportError, ValueError) as exc:
        return None, f"{reason}; locating it failed ({_first_line(exc)})"
    if spec is None or not spec.submodule_search_locations:
        return None, reason
    package_dir = list(spec.submodule_search_locations)[0]
    errors = [reason]
    for suffix in ("_130", "_121"):
        candidates = sorted(
            name for name in os.listdir(package_dir)
            if name.startswith(f"PyNvVideoCodec{suffix}.") and name.endswith((".so", ".pyd"))
        )
        for name in candidates:
            try:
                ext_spec = importlib.util.spec_from_file_location("_PyNvVideoCodec", os.path.join(package_dir, name))
                module = importlib.util.module_from_spec(ext_spec)
                ext_spec.loader.exec_module(module)
            except Exception as exc:  # a missing driver library shows up as ImportError/OSError
                errors.append(f"loading {name} failed ({_first_line(exc, 160)})")
                continue
            if hasattr(module, "CreateDecoder"):
                return module, ""
    return None, "; ".join(errors)


def reset_probes() -> None:
    """Forget cached imports and capability results (tests; after installing a driver)."""
    for probe in (_import_nvc, _decoder_module, nvenc_capability, nvdec_capability):
        probe.cache_clear()


def _enum(enum_cls: Any, *names: str, value: int | None = None) -> Any:
    """A pybind11 enum member by one of several spellings, or by its integer value."""
    for name in names:
        if hasattr(enum_cls, name):
            return getattr(enum_cls, name)
    members = getattr(enum_cls, "__members__", {})
    for name in names:
        if name in members:
            return members[name]
    if value is not None:
        for member in members.values():
            if int(member) == value:
                return member
    raise AttributeError(f"{enum_cls!r} has none of {names} (value {value})")


# --------------------------------------------------------------------------- capability


def _probe_frame(width: int = 256, height: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    plane = (128 + 40 * np.sin(xx / 9.0) * np.cos(yy / 7.0)).astype(np.uint8)
    return np.ascontiguousarray(np.stack([plane, plane[::-1], plane[:, ::-1]]))


def _on_own_thread(probe):
    """Run a probe on a thread of its own. PyNvVideoCodec makes CUDA contexts of its own
    to open an encoder or decoder; one left current on the caller's thread would take that
    thread's later CUDA work (torch's, the gpu codec's kernels) into it: the likely cause
    of a daemon (H100) that warmed the gpu codec up on the thread that had run these
    probes and then failed its first FORWARD on another ("invalid resource handle")."""

    @functools.wraps(probe)
    def isolated(*args, **kwargs):
        result: list = []

        def run():
            try:
                result.append((True, probe(*args, **kwargs)))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
                result.append((False, exc))

        thread = threading.Thread(target=run, name="comfy-mesh-codec-probe", daemon=True)
        thread.start()
        thread.join()
        ok, value = result[0]
        if not ok:
            raise value
        return value

    return isolated


@functools.lru_cache(maxsize=None)
@_on_own_thread
def nvenc_capability(gpu_id: int = 0) -> tuple[bool, str]:
    """(usable, reason): can this process open an NVENC HEVC 4:4:4 session on `gpu_id`
    and encode a frame? Found by trying (about 0.5 s once), never from NVML."""
    nvc, reason = _import_nvc()
    if nvc is None:
        return False, reason
    try:
        encoder = _open_encoder(nvc, 256, 256, qp=30, preset="P1", tuning="high_quality", gpu_id=gpu_id)
        units = _access_units(encoder.Encode(_probe_frame())) + _access_units(encoder.EndEncode())
        del encoder
    except Exception as exc:  # NVENC errors arrive as several pybind exception types
        return False, f"cannot open an NVENC HEVC 4:4:4 session on GPU {gpu_id} ({_first_line(exc)})"
    if len(units) != 1:
        return False, f"NVENC returned {len(units)} access units for one test frame on GPU {gpu_id}"
    return True, f"NVENC HEVC 4:4:4 session opened on GPU {gpu_id}"


@functools.lru_cache(maxsize=None)
@_on_own_thread
def nvdec_capability(gpu_id: int = 0) -> tuple[bool, str]:
    """(usable, reason): can this process decode HEVC 4:4:4 8-bit with NVDEC on `gpu_id`?"""
    nvc, reason = _decoder_module()
    if nvc is None:
        return False, reason
    try:
        hevc = _enum(nvc.cudaVideoCodec, "HEVC")
        chroma = _enum(nvc.cudaVideoChromaFormat, "YUV444", "_444", "444", value=_CHROMA_444)
        caps = nvc.GetDecoderCaps(gpuid=gpu_id, codec=hevc, chromaformat=chroma, bitdepth=8)
        if not caps.get("supported", 0):
            return False, f"NVDEC on GPU {gpu_id} does not decode HEVC 4:4:4 8-bit (caps {dict(caps)})"
        decoder = _open_decoder(nvc, gpu_id, 256, 256)
        del decoder
    except Exception as exc:  # CUDA/NVDEC errors arrive as several pybind exception types
        return False, f"cannot open an NVDEC HEVC decoder on GPU {gpu_id} ({_first_line(exc)})"
    return True, (
        f"NVDEC HEVC 4:4:4 on GPU {gpu_id} (max {caps.get('width_max')}x{caps.get('height_max')}, "
        f"{caps.get('num_decoder_engines')} engines)"
    )


# --------------------------------------------------------------------------- encoder


def _open_encoder(nvc: Any, width: int, height: int, qp: int, preset: str, tuning: str, gpu_id: int) -> Any:
    """An NVENC HEVC 4:4:4 session taking (3, H, W) uint8 frames from host memory."""
    return nvc.CreateEncoder(
        width, height, "YUV444", True,
        codec="hevc", preset=preset, tuning_info=tuning, rc="constqp", constqp=str(qp),
        gop="1", idrperiod="1", bf="0", repeatspspps="1", gpu_id=str(gpu_id),
    )


def _access_units(result: Any) -> list[bytes]:
    """Access units from Encode/EndEncode: a list of dicts with 'data' (2.x), or bytes."""
    if result is None:
        return []
    if isinstance(result, (bytes, bytearray, memoryview)):
        return split_access_units(bytes(result))
    units = []
    for item in result:
        data = item["data"] if isinstance(item, dict) else getattr(item, "data", item)
        data = bytes(data)
        if data:
            units.append(data)
    return units


#: HEVC NAL unit types (H.265 table 7-1) this module looks for.
VPS_NUT, IDR_W_RADL, IDR_N_LP = 32, 19, 20


def nal_units(stream: bytes) -> list[tuple[int, int]]:
    """(offset of the start code, NAL unit type) of every NAL unit in an Annex-B stream;
    a 4-byte start code's leading zero counts as part of it."""
    out = []
    i = stream.find(b"\x00\x00\x01")
    while i >= 0 and i + 3 < len(stream):
        out.append((i - 1 if i > 0 and stream[i - 1] == 0 else i, (stream[i + 3] >> 1) & 0x3F))
        i = stream.find(b"\x00\x00\x01", i + 3)
    return out


def split_access_units(stream: bytes) -> list[bytes]:
    """Split an Annex-B stream of our frames (each starting with a VPS) into access units."""
    starts = [offset for offset, kind in nal_units(stream) if kind == VPS_NUT]
    if not starts:
        return [stream] if stream else []
    starts[0] = 0
    return [stream[a:b] for a, b in zip(starts, starts[1:] + [len(stream)])]


def self_contained(unit: bytes) -> bool:
    """An access unit any decoder can start from: VPS first, and an IDR picture."""
    kinds = [kind for _, kind in nal_units(unit)]
    return bool(kinds) and kinds[0] == VPS_NUT and bool({IDR_W_RADL, IDR_N_LP} & set(kinds))


def _encode_one(encoder: Any, frame: np.ndarray, flags: int) -> Any:
    """Encode(frame, flags) forcing an IDR picture with its parameter sets; plain
    Encode(frame) where this build has no such overload (gop=1, idrperiod=1 and
    repeatspspps=1 already ask for the same)."""
    try:
        return encoder.Encode(frame, flags)
    except TypeError:  # pybind11: no overload takes (array, int) in this build
        return encoder.Encode(frame)


def _with_headers(encoder: Any, units: list[bytes]) -> list[bytes]:
    """Every access unit self-contained (VPS/SPS/PPS + IDR): each message must decode
    alone, whatever the session encoded before."""
    if all(self_contained(u) for u in units):
        return units
    headers = bytes(encoder.GetSequenceParams())
    fixed = [u if self_contained(u) else headers + u for u in units]
    if not all(self_contained(u) for u in fixed):
        kinds = [[kind for _, kind in nal_units(u)][:6] for u in units]
        raise CodecError(
            f"nvenc: the encoder wrote access units that are not IDR pictures (NAL types {kinds}); "
            "they would depend on earlier messages. Use the x265 codec and report this driver"
        )
    return fixed


def _pic_flags(nvc: Any) -> int:
    try:
        flags = nvc.NV_ENC_PIC_FLAGS
        return int(_enum(flags, "FORCEIDR")) | int(_enum(flags, "OUTPUT_SPSPPS"))
    except (AttributeError, TypeError, ValueError):
        return _FORCE_IDR_WITH_HEADERS


@dataclass(frozen=True)
class NvencSettings(VideoSettings):
    """Encoder settings of the nvenc codec (VideoSettings, and these)."""

    #: NVENC preset, P1 (fastest) .. P7.
    preset: str = "P4"
    #: NVENC tuning: high_quality, low_latency or ultra_low_latency.
    tuning: str = "high_quality"
    #: CUDA device ordinal of the encoder (and of the encode-time decode).
    gpu_id: int = 0
    #: decode each message once at encode time to state its measured error and a tight
    #: hard bound; False states only a loose a-priori bound (saves the decode).
    measure_error: bool = True

    codec_name = "nvenc"
    pix_fmt = "yuv444p"  # NVENC has no 4:0:0 HEVC input

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in NVENC_PRESETS:
            raise CodecError(f"nvenc codec preset must be one of {', '.join(NVENC_PRESETS)}, got {self.preset!r}")
        if self.tuning not in NVENC_TUNINGS:
            raise CodecError(f"nvenc codec tuning must be one of {', '.join(NVENC_TUNINGS)}, got {self.tuning!r}")
        if isinstance(self.gpu_id, bool) or not isinstance(self.gpu_id, int) or self.gpu_id < 0:
            raise CodecError(f"nvenc codec gpu_id must be an int >= 0, got {self.gpu_id!r}")
        if not isinstance(self.measure_error, bool):
            raise CodecError(f"nvenc codec measure_error must be True or False, got {self.measure_error!r}")


_LIVE: "weakref.WeakSet[NvencCodec]" = weakref.WeakSet()


def close_all() -> None:
    """Close every cached NVENC session in this process (registered with atexit)."""
    for codec in list(_LIVE):
        codec.close()


atexit.register(close_all)


class NvencCodec(HevcCodec):
    """Lossy codec: HEVC by NVENC; decoded by NVDEC, or in software where there is none."""

    name = "nvenc"
    Settings = NvencSettings

    def __init__(self, settings: NvencSettings | None = None) -> None:
        super().__init__(settings)
        self._sessions: OrderedDict[tuple, Any] = OrderedDict()
        self._decoders: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        #: which decoder the last decode used: "nvdec" or "software" (for logs and tests)
        self.last_decoder: str | None = None
        _LIVE.add(self)

    @staticmethod
    def capability() -> tuple[bool, str]:
        return nvenc_capability(0)

    @staticmethod
    def decode_capability() -> tuple[bool, str]:
        ok, reason = nvdec_capability(0)
        if ok:
            return True, reason
        soft_ok, soft_reason = software_decoder_capability()
        if soft_ok:
            return True, f"in software: {soft_reason} (no NVDEC: {reason})"
        return False, f"no NVDEC ({reason}) and no software decoder ({soft_reason})"

    def _measure(self) -> bool:
        return self.settings.measure_error

    # -- sessions

    def close(self) -> None:
        """Close this codec's NVENC sessions and NVDEC decoders (reopened on demand)."""
        # Every message already ended with EndEncode, so nothing is queued: dropping the
        # last references runs PyNvEncoder's destructor, which destroys the session.
        with self._lock:
            self._sessions.clear()
            self._decoders.clear()

    def __enter__(self) -> "NvencCodec":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _session(self, nvc: Any, layout: Layout, qp: int, fresh: bool = False) -> Any:
        s = self.settings
        key = (layout.width, layout.height, qp, s.preset, s.tuning, s.gpu_id)
        if fresh:
            self._sessions.pop(key, None)
        encoder = self._sessions.get(key)
        if encoder is None:
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.popitem(last=False)
            try:
                encoder = _open_encoder(nvc, layout.width, layout.height, qp, s.preset, s.tuning, s.gpu_id)
            except Exception as exc:  # pybind exceptions of several types
                raise CodecError(
                    f"nvenc: cannot open an NVENC session for {layout.width}x{layout.height} 4:4:4 at QP {qp} "
                    f"on GPU {s.gpu_id} ({_first_line(exc)}); use the x265 or cpu codec on this machine"
                ) from None
            self._sessions[key] = encoder
        self._sessions.move_to_end(key)
        return encoder

    def _encode_frames(self, frames: Sequence[np.ndarray], layout: Layout, qp: int) -> list[bytes]:
        ok, reason = nvenc_capability(self.settings.gpu_id)
        if not ok:
            raise CodecError(f"the nvenc codec cannot encode here: {reason}")
        nvc, _ = _import_nvc()
        flags = _pic_flags(nvc)
        with self._lock:
            for attempt in range(2):
                encoder = self._session(nvc, layout, qp, fresh=attempt > 0)
                try:
                    units: list[bytes] = []
                    for frame in frames:
                        # numpy, not torch (a tensor has .cuda and would take the GPU path)
                        units += _access_units(_encode_one(encoder, np.ascontiguousarray(frame), flags))
                    units += _access_units(encoder.EndEncode())
                except Exception as exc:  # a drained or broken session: rebuild once
                    if attempt:
                        raise CodecError(f"nvenc: encoding failed ({_first_line(exc)})") from None
                    log.info("nvenc: session failed (%s); reopening it", _first_line(exc))
                    continue
                if len(units) == len(frames):
                    return _with_headers(encoder, units)
                if attempt:
                    raise CodecError(f"nvenc: {len(units)} access units for {len(frames)} frames")
                log.info("nvenc: %d access units for %d frames; reopening the session", len(units), len(frames))
        raise AssertionError("unreachable")

    # -- decode

    def _decode_frames(self, packets: Sequence[Any], layout: Layout) -> list[np.ndarray]:
        ok, reason = nvdec_capability(self.settings.gpu_id)
        if ok and layout.planes != 3:
            ok, reason = False, "NVDEC does not decode 4:0:0 (gray) HEVC: error 801 on an H200"
        if ok:
            try:
                frames = self._decode_nvdec(packets, layout)
            except CodecError:
                raise
            except Exception as exc:  # NVDEC trouble: the software decoder gives the same frames
                log.warning("nvenc: NVDEC decode failed (%s); decoding in software", _first_line(exc))
            else:
                self.last_decoder = "nvdec"
                return frames
        else:
            log.debug("nvenc: no NVDEC (%s); decoding in software", reason)
        ok, soft_reason = software_decoder_capability()
        if not ok:
            raise CodecError(f"cannot decode an nvenc message here: no NVDEC ({reason}) and no software decoder ({soft_reason})")
        self.last_decoder = "software"
        return decode_hevc_software(packets, layout)

    def _decode_nvdec(self, packets: Sequence[Any], layout: Layout) -> list[np.ndarray]:
        nvc, _ = _decoder_module()
        key = (layout.width, layout.height, self.settings.gpu_id)
        with self._lock:
            decoder = self._decoders.pop(key, None) or _open_decoder(nvc, self.settings.gpu_id, layout.width, layout.height)
            frames, drained = nvdec_decode(nvc, decoder, packets, layout)
            if not drained:  # a decoder that saw end-of-stream is not reused
                self._decoders[key] = decoder
                while len(self._decoders) > MAX_DECODERS:
                    self._decoders.pop(next(iter(self._decoders)))
        return frames


def _open_decoder(nvc: Any, gpu_id: int, width: int, height: int) -> Any:
    return nvc.CreateDecoder(
        gpuid=gpu_id,
        codec=_enum(nvc.cudaVideoCodec, "HEVC"),
        cudacontext=0,
        cudastream=0,
        usedevicememory=False,
        maxwidth=width,
        maxheight=height,
        outputColorType=_enum(nvc.OutputColorType, "NATIVE"),
        latency=_enum(nvc.DisplayDecodeLatencyType, "LOW", "DISPLAYDECODELATENCY_LOW"),
    )


def _host_planes(picture: Any, layout: Layout) -> np.ndarray:
    """(3, H, W) uint8 copy of a decoded 4:4:4 frame held in host memory."""
    h, w = layout.height, layout.width
    views = picture.cuda()
    out = np.empty((3, h, w), dtype=np.uint8)
    if len(views) >= 3:
        for p in range(3):
            shape, stride = tuple(views[p].shape), tuple(views[p].stride)
            pitch = stride[0] if stride else w
            if shape[:2] != (h, w):
                raise CodecError(f"NVDEC plane {p} is {shape}, expected ({h}, {w}): the stream does not match its header")
            raw = np.ctypeslib.as_array(ctypes.cast(picture.GetPtrToPlane(p), ctypes.POINTER(ctypes.c_uint8)), shape=(h * pitch,))
            out[p] = raw.reshape(h, pitch)[:, :w]
    else:  # one view of the three planes stacked: (3H, W)
        shape = tuple(views[0].shape)
        if shape[:2] != (3 * h, w):
            raise CodecError(f"NVDEC frame is {shape}, expected ({3 * h}, {w}) for 4:4:4: the stream does not match its header")
        raw = np.ctypeslib.as_array(ctypes.cast(picture.GetPtrToPlane(0), ctypes.POINTER(ctypes.c_uint8)), shape=(3 * h * w,))
        out[:] = raw.reshape(3, h, w)
    return out


def nvdec_decode(nvc: Any, decoder: Any, packets: Sequence[Any], layout: Layout) -> tuple[list[np.ndarray], bool]:
    """Frames from access units through an NVDEC decoder; (frames, whether an
    end-of-stream packet was needed to get them all)."""
    flag = _enum(nvc.VideoPacketFlag, "ENDOFPICTURE")
    frames: list[np.ndarray] = []
    for i, unit in enumerate(packets):
        data = np.frombuffer(bytes(unit), dtype=np.uint8)  # owned here while NVDEC reads it
        packet = nvc.PacketData()
        packet.bsl_data = int(data.ctypes.data)
        packet.bsl = int(data.nbytes)
        packet.pts = i
        packet.decode_flag = flag
        frames.extend(_host_planes(p, layout) for p in decoder.Decode(packet))
    drained = False
    if len(frames) < layout.frames:
        eos = nvc.PacketData()
        eos.bsl_data = 0
        eos.bsl = 0
        frames.extend(_host_planes(p, layout) for p in decoder.Decode(eos))
        drained = True
    check_frames(frames, layout, "NVDEC output")
    return frames, drained
