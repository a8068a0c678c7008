"""Check that NVDEC decodes the x265 codec's HEVC streams bit-exactly, on a GPU machine.

An H100/H200 has NVDEC (HEVC 4:4:4) but no NVENC. This script takes x265 messages (HEVC
written on the CPU, the bitstream the nvenc codec writes too), decodes every access unit
with NVDEC through PyNvVideoCodec and with FFmpeg's software decoder, and asserts the
decoded frames are identical, byte for byte. It also decodes each message through the
nvenc codec's own NVDEC path and compares the tensor, times everything, and reports the
capability probes (nvenc must say "unavailable" with the reason on an H100) and whether
`import PyNvVideoCodec` works. One JSON document on stdout; exit status 1 if any frame
differs or NVDEC could not be tested at all.

Two ways to get the streams:

* full mode (PyAV importable here): encode on this machine with x265, decode with FFmpeg
  here (and with FFmpeg's own NVDEC wrapper, hevc_cuvid, as a second opinion);
* streams mode (no PyAV here: the av wheel is 36 MB, too much to carry beside
  PyNvVideoCodec's 27 MB): `--write-streams DIR` on a machine with PyAV (the CPU VM)
  encodes the messages and records SHA-256 digests of FFmpeg's decoded frames and of the
  decoded tensors; `--streams DIR` on the GPU machine decodes them with NVDEC and compares.

    bash bench/device_wheels.sh                                        # CPU VM: .whl/ incl. PyNvVideoCodec
    python bench/nvdec_check.py --write-streams .whl/nvdec_streams     # CPU VM (12.7 MB, carried in .whl/)
    . bench/device_setup.sh && python bench/nvdec_check.py --streams .whl/nvdec_streams   # GPU machine
    python bench/nvdec_check.py                                        # GPU machine with PyAV installed

Measured on an H200 (driver 580.159.04, Python 3.12, torch 2.11+cu130): all five 4:4:4
streams bit-exact; 4:0:0 refused by NVDEC (error 801); nvenc unavailable (error 2).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comfy_mesh.codec import CodecError, EncodedTensor, get
from comfy_mesh.codec import nvenc, video_pack
from comfy_mesh.codec.registry import capabilities
from comfy_mesh.codec.synthetic import ActivationShape, activation_like
from comfy_mesh.codec.x265 import parse_message, software_decoder_capability

#: (name, tensor factory, x265 settings, MAX_AREA override or None)
CASES: list[tuple[str, Any, dict, int | None]] = [
    ("activation_like 4608x256 bf16 qp13",
     lambda: activation_like(ActivationShape(), seed=0).to(torch.bfloat16), {"qp": 13}, None),
    ("activation_like 4099x256 f32 qp4 (prime token count)",
     lambda: activation_like(ActivationShape(tokens=4099), seed=1), {"qp": 4}, None),
    ("corpus dit-like 4608x768 bf16 qp18, FLUX.2 grid",
     "corpus", {"qp": 18, "grid_width": 64, "prefix_tokens": 512}, None),
    ("multi-frame 2x1000x96 bf16 qp9 (MAX_AREA forced to 16 Kpx)",
     lambda: activation_like(ActivationShape(tokens=2000, channels=96), seed=2).reshape(2, 1000, 96).to(torch.bfloat16),
     {"qp": 9}, 16384),
    ("FLUX.2 dev carry 4608x6144 bf16 qp30 (one 4096x2304 frame)",
     lambda: activation_like(ActivationShape(channels=6144), seed=3).to(torch.bfloat16), {"qp": 30}, None),
    ("gray 4608x96 bf16 qp13 (4:0:0; NVDEC may refuse: reported, not required)",
     lambda: activation_like(ActivationShape(channels=96), seed=4).to(torch.bfloat16), {"qp": 13, "pix_fmt": "gray"}, None),
]


def sha256(data: Any) -> str:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    return sha256(t.contiguous().view(torch.uint8).numpy())


def make_tensor(factory: Any) -> torch.Tensor:
    if factory == "corpus":
        from comfy_mesh.codec.corpus import CorpusSpec, synthetic_carry

        return synthetic_carry(CorpusSpec(channels=768), seed=0)[0].to(torch.bfloat16)
    return factory()


@contextlib.contextmanager
def max_area(value: int | None):
    saved = video_pack.MAX_AREA
    if value:
        video_pack.MAX_AREA = value
    try:
        yield
    finally:
        video_pack.MAX_AREA = saved


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# --------------------------------------------------------------------------- environment


def import_report() -> dict[str, Any]:
    report: dict[str, Any] = {}
    try:
        module = importlib.import_module("PyNvVideoCodec")
        report["import_PyNvVideoCodec"] = {"ok": True, "version": getattr(module, "__version__", None),
                                           "file": getattr(module, "__file__", None)}
    except Exception as exc:  # RuntimeError where libnvidia-encode is missing
        report["import_PyNvVideoCodec"] = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"}
    module, reason = nvenc._decoder_module()
    report["decoder_module"] = {"ok": module is not None, "reason": reason,
                                "name": getattr(module, "__name__", None), "file": getattr(module, "__file__", None)}
    try:
        import av

        report["pyav"] = {"ok": True, "version": av.__version__,
                          "hevc_cuvid": "hevc_cuvid" in av.codecs_available, "libx265": "libx265" in av.codecs_available}
    except Exception as exc:
        report["pyav"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return report


def decoder_caps() -> dict[str, Any]:
    module, reason = nvenc._decoder_module()
    if module is None:
        return {"error": reason}
    out = {}
    for label, value in (("hevc_444_8bit", 3), ("hevc_420_8bit", 1), ("hevc_monochrome_8bit", 0)):
        try:
            chroma = nvenc._enum(module.cudaVideoChromaFormat, value=value)
            caps = module.GetDecoderCaps(gpuid=0, codec=nvenc._enum(module.cudaVideoCodec, "HEVC"), chromaformat=chroma, bitdepth=8)
            out[label] = dict(caps)
        except Exception as exc:
            out[label] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def gpu_report() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- decoders


def nvdec_frames(payload: Any) -> tuple[dict[str, float], list[np.ndarray]]:
    """NVDEC (PyNvVideoCodec, host output): (timings, frames)."""
    module, reason = nvenc._decoder_module()
    if module is None:
        raise RuntimeError(reason)
    layout = payload.side.layout
    t_open, decoder = timed(lambda: nvenc._open_decoder(module, 0, layout.width, layout.height))
    t_dec, (frames, drained) = timed(lambda: nvenc.nvdec_decode(module, decoder, payload.packets, layout))
    # Reuse: a second message through the same decoder (the codec caches decoders).
    t_again = None
    if not drained:
        t_again, (again, _) = timed(lambda: nvenc.nvdec_decode(module, decoder, payload.packets, layout))
        if any(not np.array_equal(a, b) for a, b in zip(again, frames)):
            raise RuntimeError("a reused NVDEC decoder returned different frames")
    return {"open_ms": t_open * 1e3, "decode_ms": t_dec * 1e3, "decode_again_ms": None if t_again is None else t_again * 1e3,
            "needed_end_of_stream": drained}, frames


def cuvid_frames(payload: Any) -> tuple[float, list[np.ndarray]]:
    """FFmpeg's own NVDEC wrapper (hevc_cuvid) through PyAV, as a second opinion."""
    import av

    layout = payload.side.layout
    ctx = av.CodecContext.create("hevc_cuvid", "r")
    start = time.perf_counter()
    pictures = []
    for unit in payload.packets:
        pictures.extend(ctx.decode(av.Packet(bytes(unit))))
    pictures.extend(ctx.decode(None))
    frames = [np.ascontiguousarray(p.to_ndarray()).reshape(layout.planes, layout.height, layout.width) for p in pictures]
    return time.perf_counter() - start, frames


def software_frames(payload: Any) -> tuple[float, list[np.ndarray]]:
    from comfy_mesh.codec.x265 import decode_hevc_software

    return timed(lambda: decode_hevc_software(payload.packets, payload.side.layout))


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    if len(a) != len(b):
        return {"identical": False, "why": f"{len(a)} vs {len(b)} frames"}
    diffs = [int(np.count_nonzero(x != y)) for x, y in zip(a, b)]
    return {"identical": not any(diffs), "differing_pixels": diffs}


# --------------------------------------------------------------------------- the check


def check_message(name: str, message: EncodedTensor, reference: dict[str, Any], mbytes: float) -> dict[str, Any]:
    """Decode one message every way available and compare."""
    row: dict[str, Any] = {"case": name, "header": {k: message.header[k] for k in
                           ("shape", "dtype", "pix_fmt", "n_frames", "frame_w", "frame_h", "qp", "n_outliers",
                            "rel_err_measured", "rel_err_bound") if k in message.header},
                           "bitstream_bytes": sum(message.header["frame_bytes"])}
    payload = parse_message(message, "x265")
    want = reference.get("frame_sha256")
    soft = None
    if software_decoder_capability()[0]:
        t, soft = software_frames(payload)
        row["ffmpeg_software"] = {"decode_ms": t * 1e3, "MBps": mbytes / t}
        if want:
            row["ffmpeg_matches_reference"] = [sha256(f) for f in soft] == want
    try:
        timings, frames = nvdec_frames(payload)
        row["nvdec"] = {**timings, "MBps": mbytes / (timings["decode_ms"] / 1e3)}
        digests = [sha256(f) for f in frames]
        if soft is not None:
            row["nvdec_vs_ffmpeg"] = compare(frames, soft)
        if want:
            row["nvdec_vs_reference_sha256"] = digests == want
        row["bit_exact"] = bool((soft is None or row["nvdec_vs_ffmpeg"]["identical"]) and (not want or digests == want))
    except Exception as exc:
        row["nvdec"] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"}
        row["bit_exact"] = None
    try:
        import av

        if "hevc_cuvid" in av.codecs_available and soft is not None:
            t, frames = cuvid_frames(payload)
            row["hevc_cuvid"] = {"decode_ms": t * 1e3, **compare(frames, soft)}
    except Exception as exc:
        row["hevc_cuvid"] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    # The nvenc codec's own decode path (NVDEC where it works, else software).
    try:
        codec = nvenc.NvencCodec()
        relabelled = EncodedTensor({**message.header, "codec": "nvenc"}, message.buffers)
        # nvenc messages are 4:4:4 only; a gray x265 message still decodes (in software).
        t, y = timed(lambda: codec.decode(relabelled))
        row["nvenc_codec_decode"] = {"decoder": codec.last_decoder, "ms": t * 1e3, "MBps": mbytes / t}
        if reference.get("tensor_sha256"):
            row["nvenc_codec_decode"]["tensor_matches_reference"] = tensor_digest(y) == reference["tensor_sha256"]
        if "x" in reference:
            err = float((y.double() - reference["x"].double()).norm() / reference["x"].double().norm())
            row["nvenc_codec_decode"]["rel_l2"] = err
            row["nvenc_codec_decode"]["within_bound"] = err <= message.rel_err_bound
    except Exception as exc:
        row["nvenc_codec_decode"] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"}
    return row


def encode_cases(selected: list[str] | None) -> list[tuple[str, EncodedTensor, dict, int | None, float]]:
    out = []
    for name, factory, settings, area in CASES:
        if selected and not any(s in name for s in selected):
            continue
        x = make_tensor(factory)
        with max_area(area):
            t, message = timed(lambda: get("x265", **settings).encode(x))
            payload = parse_message(message, "x265")
            _, frames = software_frames(payload)
            y = get("x265").decode(message)
        mbytes = x.numel() * x.element_size() / 1e6
        reference = {"frame_sha256": [sha256(f) for f in frames], "tensor_sha256": tensor_digest(y), "x": x,
                     "encode_ms": t * 1e3}
        out.append((name, message, reference, area, mbytes))
    return out


def write_streams(directory: Path, selected: list[str] | None) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (name, message, reference, area, mbytes) in enumerate(encode_cases(selected)):
        files = []
        for j, buf in enumerate(message.buffers):
            path = directory / f"case{i}-buf{j}.bin"
            path.write_bytes(bytes(memoryview(buf)))
            files.append(path.name)
        index.append({"name": name, "header": message.header, "buffers": files, "max_area": area, "tensor_MB": mbytes,
                      "frame_sha256": reference["frame_sha256"], "tensor_sha256": reference["tensor_sha256"],
                      "encode_ms_on_writer": reference["encode_ms"]})
    (directory / "cases.json").write_text(json.dumps({"written_on": platform.platform(), "cases": index}, indent=1))
    return {"wrote": str(directory), "cases": [c["name"] for c in index],
            "bytes": sum(p.stat().st_size for p in directory.iterdir())}


def read_streams(directory: Path) -> list[tuple[str, EncodedTensor, dict, int | None, float]]:
    index = json.loads((directory / "cases.json").read_text())
    out = []
    for case in index["cases"]:
        buffers = [(directory / name).read_bytes() for name in case["buffers"]]
        message = EncodedTensor(case["header"], buffers)
        reference = {"frame_sha256": case["frame_sha256"], "tensor_sha256": case["tensor_sha256"]}
        out.append((case["name"], message, reference, case["max_area"], case["tensor_MB"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-streams", type=Path, help="encode the cases into DIR (needs PyAV) and stop")
    parser.add_argument("--streams", type=Path, help="check streams written by --write-streams (no PyAV needed)")
    parser.add_argument("--only", nargs="*", help="run cases whose name contains one of these words")
    args = parser.parse_args(argv)

    if args.write_streams:
        json.dump(write_streams(args.write_streams, args.only), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    report: dict[str, Any] = {"benchmark": "nvdec_check", "machine": {"platform": platform.platform(),
                              "python": sys.version.split()[0], "cpus": os.cpu_count(), **gpu_report()}}
    report.update(import_report())
    start = time.perf_counter()
    report["capabilities"] = {name: {"usable": ok, "reason": why} for name, (ok, why) in capabilities().items()}
    report["capability_probe_s"] = time.perf_counter() - start
    report["nvenc_capability"] = dict(zip(("usable", "reason"), nvenc.nvenc_capability()))
    report["nvdec_capability"] = dict(zip(("usable", "reason"), nvenc.nvdec_capability()))
    try:
        get("nvenc")
        report["get_nvenc"] = "returned a codec: NVENC works here"
    except CodecError as exc:
        report["get_nvenc"] = f"CodecError: {exc}"
    report["decoder_caps"] = decoder_caps()

    rows = []
    try:
        cases = read_streams(args.streams) if args.streams else encode_cases(args.only)
    except Exception as exc:
        report["error"] = f"cannot get the test streams: {type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        cases = []
    for name, message, reference, area, mbytes in cases:
        with max_area(area):
            try:
                rows.append(check_message(name, message, reference, mbytes))
            except Exception as exc:
                rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        rows[-1]["tensor_MB"] = mbytes
        if "encode_ms" in reference:
            rows[-1]["x265_encode_ms"] = reference["encode_ms"]
    report["cases"] = rows
    required = [r for r in rows if "gray" not in r["case"]]
    tested = [r for r in required if r.get("bit_exact") is not None]
    report["all_bit_exact"] = bool(tested) and all(r["bit_exact"] for r in tested)
    report["nvdec_tested_cases"] = len(tested)
    json.dump(report, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    for r in rows:
        nv = r.get("nvdec", {})
        print(f"{r['case'][:60]:60s} bit_exact={r.get('bit_exact')} nvdec={nv.get('decode_ms', nv.get('error', '-'))}",
              file=sys.stderr)
    return 0 if report["all_bit_exact"] and len(tested) == len(required) else 1


if __name__ == "__main__":
    raise SystemExit(main())
