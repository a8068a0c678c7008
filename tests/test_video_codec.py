"""Video codecs: the 8-bit packing (layout limits, exact inverse), x265 round trips and
their stated errors, damaged messages refused, and nvenc's capability reporting, its
software-decode fallback and its session logic against a stand-in PyNvVideoCodec
(this CI machine has no NVIDIA GPU; the real-hardware tests skip with the reason)."""

from __future__ import annotations

import ctypes
import json
import math
import random
import sys
import types

import numpy as np
import pytest
import torch

from comfy_mesh.codec import CodecError, EncodedTensor, decode, get
from comfy_mesh.codec import nvenc, video_pack
from comfy_mesh.codec.registry import available, capabilities, decode_capabilities
from comfy_mesh.codec.synthetic import ActivationShape, activation_like

from codec_messages import with_buffer, with_header
from comfy_mesh.codec.video_pack import (
    ALIGN,
    MAX_AREA,
    MAX_SIDE,
    MIN_SIDE,
    PackSettings,
    dequantise,
    pack,
    plan_layout,
    qp_for_quality,
    token_positions,
    unpack,
)
from comfy_mesh.codec.x265 import decode_hevc_software, encode_x265, parse_message, x265_capability

pytestmark = pytest.mark.skipif(not x265_capability()[0], reason=f"no x265: {x265_capability()[1]}")


def rel_l2(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y.double() - x.double()).norm() / x.double().norm())


def as_bytes_message(message: EncodedTensor) -> EncodedTensor:
    """What a receiver holds: the header through JSON, every buffer as bytes."""
    return EncodedTensor(json.loads(message.header_bytes()), [bytes(memoryview(b)) for b in message.buffers])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def reference_8bit(x: torch.Tensor, side) -> torch.Tensor:
    """The 8-bit quantised reconstruction, computed independently of video_pack's code."""
    channels = x.shape[-1] if x.dim() else 1
    xf = x.float().reshape(-1, channels)
    c = torch.from_numpy(side.centers)
    step = torch.from_numpy(side.steps)
    r = ((xf - c) / torch.where(step > 0, step, torch.ones(()))).round().clamp(-127, 127)
    y = r * step + c  # (code - 128) * step + c, in float32
    y.view(-1)[torch.from_numpy(side.outlier_index)] = torch.from_numpy(side.outlier_value)
    return y


@pytest.fixture(scope="module")
def activations() -> torch.Tensor:
    return activation_like(ActivationShape(), seed=0)  # 4608 x 256


@pytest.fixture(scope="module")
def small() -> torch.Tensor:
    return activation_like(ActivationShape(tokens=499, channels=37, loud_tokens=2), seed=3)


# --------------------------------------------------------------------------- layout


PRIMES = [2, 3, 5, 7, 13, 127, 1021, 4099, 8191, 65537]


@pytest.mark.parametrize("tokens", PRIMES + [1, 4096, 4608, 9216, 37 * 101])
@pytest.mark.parametrize("channels", [1, 37, 256])
def test_layout_limits_any_token_count(tokens, channels):
    L = plan_layout((tokens, channels), planes=3)
    for side in (L.width, L.height):
        assert MIN_SIDE <= side <= MAX_SIDE and side % ALIGN == 0  # so even too
    assert L.width * L.height <= MAX_AREA
    assert L.tile_w % ALIGN == 0 and L.tile_h % ALIGN == 0
    assert L.grid_width * L.tile_h >= tokens  # every token has a place
    # Near-square tiles: never a 1 x N strip, whatever the token count.
    assert max(L.tile_h, L.tile_w) <= 2 * min(L.tile_h, L.tile_w), (L.tile_h, L.tile_w)
    assert L.tiles_x * L.tile_w <= L.width and L.tiles_y * L.tile_h <= L.height
    assert L.slots >= channels and L.frames == 1
    # Padding stays small for large counts (the search minimises it).
    if tokens >= 1000:
        assert L.tile_h * L.tile_w <= 1.15 * tokens


def test_layout_positions_are_distinct_and_inside_the_tile():
    for shape, grid, prefix in [((4099, 8), 0, 0), ((4608, 8), 64, 512), ((700, 8), 30, 77), ((5, 3), 0, 9)]:
        L = plan_layout(shape, 3, grid, prefix)
        pos = token_positions(L)
        assert len({(int(r), int(c)) for r, c in pos}) == L.tokens
        assert (pos[:, 0] < L.tile_h).all() and (pos[:, 1] < L.grid_width).all()
        if 0 < L.prefix_tokens < L.tokens:
            # The image grid starts on a fresh row, with its first token in column 0.
            first = pos[L.prefix_tokens]
            assert first[1] == 0 and first[0] == L.prefix_rows > pos[L.prefix_tokens - 1][0]


def test_layout_flux_grid_lines_up_image_rows():
    # FLUX.2 at 1024 px: 512 text tokens, then a 64 x 64 latent grid.
    L = plan_layout((4608, 6144), 3, grid_width=64, prefix_tokens=512)
    assert (L.tile_w, L.tile_h, L.prefix_rows) == (64, 72, 8)
    pos = token_positions(L)
    # Image token (i, j) of the latent grid sits at row 8 + i, column j.
    assert tuple(pos[512 + 5 * 64 + 7]) == (13, 7)
    assert (L.frames, L.width, L.height) == (1, 4096, 2304)  # one 4:4:4 frame, 9.4 Mpx


def test_layout_many_frames_and_batches():
    L = plan_layout((65536, 2048), 3)  # a 256 x 256 grid: 2048 tiles of 64 Kpx
    assert L.frames > 1
    assert L.width <= MAX_SIDE and L.height <= MAX_SIDE and L.width * L.height <= MAX_AREA
    assert L.slots >= 2048 and L.slots - 2048 < L.frames * L.planes * L.tiles_x  # tiles spread evenly
    B = plan_layout((2, 4608, 3072), 3)
    assert B.items == 2 and B.n_tiles == 6144
    assert plan_layout((3, 4, 5, 7), 1).items == 12


def test_layout_refuses_what_cannot_fit():
    with pytest.raises(CodecError, match="frame"):
        plan_layout((8192 * 9000, 2), 3, grid_width=8)
    with pytest.raises(CodecError):
        PackSettings(grid_width=10000)
    with pytest.raises(CodecError):
        PackSettings(pix_fmt="yuv420p")


def test_quality_to_qp_mapping():
    clip = video_pack.effective_clip
    assert [qp_for_quality(q, clip(q, 6.0)) for q in (4, 7, 10, 12)] == [18, 13, 9, 9]
    assert clip(12, 6.0) == pytest.approx(63.5 / 12)  # high quality narrows the 8-bit range
    qps = [qp_for_quality(q, clip(q, 6.0)) for q in (1, 2, 4, 7, 10, 20, 40)]
    assert qps == sorted(qps, reverse=True) and all(0 <= qp <= 51 for qp in qps)


# --------------------------------------------------------------------------- packing


PACK_SHAPES = [(4099, 37), (2, 100, 37), (1, 64), (64,), (), (3, 1, 5), (257, 131)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", PACK_SHAPES)
def test_unpack_of_pack_is_exactly_the_8bit_quantisation(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    if x.numel() > 10:
        x.view(-1)[::97] *= 50  # loud values: outliers
    frames, side = pack(x, PackSettings())
    for f in frames:
        assert f.dtype == np.uint8 and f.flags.c_contiguous and f.shape == (3, side.layout.height, side.layout.width)
    expected = reference_8bit(x, side)
    assert torch.equal(bits(dequantise(frames, side)), bits(expected))
    y = unpack(frames, side)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(bits(y), bits(expected.to(dtype).reshape(x.shape)))
    # Outliers come back exactly.
    assert torch.equal(bits(y.reshape(-1)[torch.from_numpy(side.outlier_index)]),
                       bits(x.reshape(-1)[torch.from_numpy(side.outlier_index)]))


def test_frames_hold_each_code_at_its_position():
    x = activation_like(ActivationShape(tokens=300, channels=10), seed=2)
    frames, side = pack(x, PackSettings(grid_width=20, prefix_tokens=17))
    L = side.layout
    pos = token_positions(L)
    codes = torch.from_numpy(frames[0])
    c, s = torch.from_numpy(side.centers), torch.from_numpy(side.steps)
    for t, ch in [(0, 0), (16, 3), (17, 9), (299, 5), (150, 7)]:
        slot = ch  # item 0: tile index = channel
        plane, rest = divmod(slot, L.tiles_x * L.tiles_y)
        ty, tx = divmod(rest, L.tiles_x)
        r, col = pos[t]
        code = int(codes[plane, ty * L.tile_h + r, tx * L.tile_w + col])
        expected = int(((x[t, ch] - c[ch]) / s[ch]).round().clamp(-127, 127)) + 128
        assert code == expected
    # Everything outside the tokens is the flat centre code.
    mask = torch.zeros(codes.shape, dtype=torch.bool)
    for ch in range(10):
        plane, rest = divmod(ch, L.tiles_x * L.tiles_y)
        ty, tx = divmod(rest, L.tiles_x)
        mask[plane, ty * L.tile_h + pos[:, 0], tx * L.tile_w + pos[:, 1]] = True
    assert bool((codes[~mask] == 128).all())


def test_one_loud_token_does_not_ruin_its_channel():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 16, generator=g)
    loud = x.clone()
    loud[123] *= 1e4
    _, side = pack(x, PackSettings(stats_tokens=0))
    _, side_loud = pack(loud, PackSettings(stats_tokens=0))
    assert np.allclose(side.steps, side_loud.steps, rtol=0.01)  # min/max would be 1e4 x
    assert side_loud.n_outliers >= 16 and set(side_loud.outlier_index // 16) >= {123}


def test_constant_and_sparse_channels():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 6, generator=g)
    x[:, 1] = 3.25
    x[:400, 2] = 0.0  # MAD 0, not constant
    frames, side = pack(x, PackSettings())
    assert side.steps[1] == 0 and side.steps[2] > 0
    y = unpack(frames, side)
    assert torch.equal(y[:, 1], x[:, 1])
    assert side.n_outliers < 50  # without the fallback spread all 100 non-zeros would be


# --------------------------------------------------------------------------- x265 round trips


def check_x265_message(x: torch.Tensor, message: EncodedTensor) -> torch.Tensor:
    y = decode(as_bytes_message(message))
    assert y.dtype == x.dtype and y.shape == x.shape
    h = message.header
    if x.numel() and x.float().abs().sum() > 0:
        err = rel_l2(y, x)
        # The measured error is what this decoder returns; the bound holds above it.
        assert err == pytest.approx(h["rel_err_measured"], rel=1e-9, abs=1e-12)
        assert err <= message.rel_err_bound
        assert message.rel_err_bound <= h["rel_err_measured"] * 1.5 + 0.01
    return y


def activations_of_shape(shape: tuple, seed: int) -> torch.Tensor:
    """activation_like tensors for any (..., T, C) shape (a 1-D shape is one token)."""
    tokens, channels = (shape[-2], shape[-1]) if len(shape) > 1 else (1, shape[0])
    items = math.prod(shape[:-2])
    spec = ActivationShape(tokens=tokens, channels=channels, loud_tokens=min(2, tokens - 1))
    return torch.stack([activation_like(spec, seed=seed + i) for i in range(items)]).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4099, 256), (2, 100, 37), (1, 64), (37,), (300, 1)])
def test_x265_round_trip(shape, dtype):
    x = activations_of_shape(shape, seed=6).to(dtype)
    message = get("x265").encode(x)
    h = message.header
    assert h["codec"] == "x265" and h["v"] == 1 and h["pix_fmt"] == "yuv444p"
    assert h["frame_w"] <= 8192 and h["frame_h"] <= 8192 and h["frame_w"] % 2 == h["frame_h"] % 2 == 0
    y = check_x265_message(x, message)
    if len(shape) == 2 and shape[0] > 1:
        assert rel_l2(y, x) < 0.05


def test_x265_activations_ratio_and_error(activations):
    x = activations.to(torch.bfloat16)
    message = get("x265").encode(x)
    y = check_x265_message(x, message)
    ratio = x.numel() * 2 / message.nbytes
    cpu = get("cpu").encode(x)
    print(f"\nx265 q7 (qp {message.header['qp']}) on 4608x256 bf16: ratio vs bf16 {ratio:.3f}, "
          f"rel_l2 {rel_l2(y, x):.4f} (bound {message.rel_err_bound:.4f}); "
          f"cpu q7: ratio {x.numel() * 2 / cpu.nbytes:.3f}, rel_l2 {rel_l2(decode(cpu), x):.4f}")
    assert ratio > 2.0 and rel_l2(y, x) < 0.03
    assert message.header["n_outliers"] >= 4 * 256 // 2  # the loud tokens


def test_x265_qp_trades_size_for_error(small):
    x = small.to(torch.bfloat16)
    results = []
    for qp in (4, 16, 30):
        message = get("x265", qp=qp).encode(x)
        assert message.header["qp"] == qp
        results.append((message.nbytes, message.header["rel_err_measured"]))
    sizes, errors = zip(*results)
    assert list(sizes) == sorted(sizes, reverse=True)
    assert list(errors) == sorted(errors)


def test_x265_gray_and_token_layout_hint():
    """Image tokens on their grid code smaller than the same tokens on a wrong grid."""
    from comfy_mesh.codec.base import TokenLayout

    g = torch.Generator().manual_seed(7)
    n_txt, h, w, channels = 40, 32, 32, 24
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    phase = torch.rand(channels, generator=g) * 6
    image = torch.sin(xx[..., None] / 5.0 + yy[..., None] / 7.0 + phase) * 2  # smooth fields
    x = torch.cat([torch.randn(n_txt, channels, generator=g), image.reshape(h * w, channels)])
    x = x + 0.02 * torch.randn(x.shape, generator=g)
    codec = get("x265", qp=20)
    right = codec.encode(x, layout=TokenLayout(n_txt=n_txt, h=h, w=w))
    assert (right.header["grid_width"], right.header["prefix_tokens"]) == (w, n_txt)
    wrong = get("x265", qp=20, grid_width=w - 3).encode(x)
    assert right.nbytes < 0.8 * wrong.nbytes
    check_x265_message(x, right)
    mismatched = codec.encode(x, layout=TokenLayout(n_txt=0, h=h, w=w))  # token count differs: ignored
    assert mismatched.header["grid_width"] == 0
    gray = get("x265", qp=20, pix_fmt="gray").encode(x, layout=TokenLayout(n_txt=n_txt, h=h, w=w))
    assert gray.header["pix_fmt"] == "gray"
    check_x265_message(x, gray)


def test_x265_multi_frame_message(monkeypatch, small):
    monkeypatch.setattr(video_pack, "MAX_AREA", 2048)  # 4 tiles of 16 x 32 a frame: several frames
    message = get("x265").encode(small)
    assert message.header["n_frames"] > 1
    assert len(message.header["frame_bytes"]) == message.header["n_frames"]
    check_x265_message(small, message)
    units = nvenc.split_access_units(bytes(message.buffers[2]))
    assert [len(u) for u in units] == message.header["frame_bytes"]


def test_x265_empty_zero_and_constant_tensors():
    for x in (torch.zeros(0, 8), torch.zeros(5, 0), torch.zeros(40, 9, dtype=torch.bfloat16),
              torch.arange(9.0).expand(40, 9)):
        message = get("x265").encode(x)
        y = decode(as_bytes_message(message))
        assert torch.equal(y, x)
        assert message.rel_err_bound == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.0**70])
def test_x265_refuses_non_finite(bad):
    x = torch.randn(20, 10)
    x[3, 4] = bad
    with pytest.raises(CodecError):
        get("x265").encode(x)


@pytest.mark.parametrize("settings", [
    {"quality": 0}, {"quality": "7"}, {"qp": 52}, {"qp": 3.0}, {"qp": True}, {"clip_sigma": -1},
    {"grid_width": -2}, {"prefix_tokens": 1.5}, {"pix_fmt": "nv12"}, {"preset": "placebo2"},
])
def test_x265_bad_settings(settings):
    with pytest.raises(CodecError):
        get("x265", **settings)


# --------------------------------------------------------------------------- damage


@pytest.fixture(scope="module")
def message(small) -> EncodedTensor:
    return as_bytes_message(get("x265").encode(small.to(torch.bfloat16)))


def test_damage_fixture_decodes(message):
    decode(message)
    assert message.header["n_outliers"] > 0


def test_truncated_bitstream_is_refused(message):
    stream = message.buffers[2]
    with pytest.raises(CodecError, match="truncated"):
        decode(with_buffer(message, 2, stream[:-100]))
    # Even with the header "fixed" to match, the CRC catches it.
    cut = with_header(with_buffer(message, 2, stream[:-100]), frame_bytes=[len(stream) - 100])
    with pytest.raises(CodecError, match="CRC-32"):
        decode(cut)


@pytest.mark.parametrize("i", range(5))
def test_every_buffer_truncated_or_extended(message, i):
    data = message.buffers[i]
    if data:
        with pytest.raises(CodecError):
            decode(with_buffer(message, i, data[:-1]))
    with pytest.raises(CodecError):
        decode(with_buffer(message, i, data + b"\0\0\0\0"))


def test_flipped_bits_are_refused(message):
    original = decode(message)
    rng = random.Random(8)
    for _ in range(40):
        i = rng.choice([0, 1, 2, 2, 2, 4])
        data = bytearray(message.buffers[i])
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        try:
            y = decode(with_buffer(message, i, bytes(data)))
        except CodecError:
            continue
        assert torch.equal(y, original)  # only a flip that cancels out may pass
        pytest.fail("a damaged buffer decoded")


def test_forged_bitstream_with_matching_crc(message):
    import zlib

    noise = random.Random(9).randbytes(len(message.buffers[2]))
    forged = with_header(with_buffer(message, 2, noise), stream_crc32=zlib.crc32(noise))
    with pytest.raises(CodecError):
        decode(forged)


@pytest.mark.parametrize("changes, word", [
    ({"shape": [499, 36]}, ""), ({"shape": [498, 37]}, ""), ({"shape": [37, 499]}, ""),
    ({"shape": [2, 499, 37]}, ""), ({"shape": KeyError}, "shape"), ({"dtype": "float64"}, "dtype"),
    ({"v": 2}, "version"), ({"v": "1"}, "version"), ({"v": KeyError}, "version"),
    ({"codec": "x266"}, "unknown codec"), ({"pix_fmt": "yuv420p"}, "pix_fmt"), ({"pix_fmt": "gray"}, ""),
    ({"grid_width": 61}, ""), ({"prefix_tokens": 3}, ""), ({"frame_w": 999}, "frames"), ({"n_frames": 2}, "frames"),
    ({"frame_bytes": [1, 2]}, "frame_bytes"), ({"frame_bytes": KeyError}, "frame_bytes"), ({"qp": 52}, "qp"),
    ({"qp": -1}, "negative"), ({"n_outliers": 0}, ""), ({"n_outliers": 10**9}, "outliers"),
    ({"rel_err_bound": float("nan")}, "rel_err_bound"), ({"rel_err_measured": -1.0}, "rel_err_measured"),
    ({"side_crc32": 1}, "CRC-32"), ({"stream_crc32": 1}, "CRC-32"), ({"stream_crc32": KeyError}, "stream_crc32"),
])
def test_bad_header_fields_are_refused(message, changes, word):
    with pytest.raises(CodecError, match=word or None):
        decode(with_header(message, **changes))


def test_wrong_buffer_count_and_non_messages(message):
    with pytest.raises(CodecError, match="buffers"):
        decode(EncodedTensor(message.header, message.buffers[:-1]))
    with pytest.raises(CodecError):
        decode(with_buffer(message, 2, 12345))
    with pytest.raises(CodecError, match="'x265'"):
        get("cpu").decode(message)


# --------------------------------------------------------------------------- registry and nvenc here


def test_registry_capabilities():
    caps = capabilities()
    assert caps["x265"][0] and "x265" in available()
    assert {"cpu", "raw", "x265"} <= set(available())
    for name, (usable, reason) in caps.items():
        assert isinstance(usable, bool) and reason, name
    # only the codecs asked for are probed (nvenc's probe opens an encoder session)
    assert capabilities(["x265", "raw"]) == {"raw": caps["raw"], "x265": caps["x265"]}
    with pytest.raises(CodecError, match="unknown codec 'nope'"):
        capabilities(["raw", "nope"])
    decoding = decode_capabilities()
    assert set(decoding) == set(caps) and decoding["x265"][0]
    assert decoding["nvenc"][0]  # with NVDEC, or else in software
    if not nvenc.nvdec_capability()[0]:
        assert "in software" in decoding["nvenc"][1]


def test_nvenc_unavailable_here_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device; the unavailable path is tested on CPU-only machines")
    usable, reason = nvenc.nvenc_capability()
    assert not usable and "PyNvVideoCodec" in reason
    assert capabilities()["nvenc"] == (False, reason)
    assert "nvenc" not in available()
    with pytest.raises(CodecError, match="cannot encode on this machine") as err:
        get("nvenc")
    assert reason in str(err.value)


def test_nvenc_message_decodes_in_software(message):
    """An nvenc message is plain HEVC: without NVDEC the software decoder reads it."""
    relabelled = with_header(message, codec="nvenc")
    codec = nvenc.NvencCodec()
    y = codec.decode(relabelled)
    if not nvenc.nvdec_capability()[0]:
        assert codec.last_decoder == "software"
    assert torch.equal(bits(y), bits(decode(message)))
    assert torch.equal(bits(decode(relabelled)), bits(y))  # through the registry too
    with pytest.raises(CodecError, match="'nvenc'"):
        get("x265").decode(relabelled)


@pytest.fixture
def fresh_probes():
    nvenc.reset_probes()
    yield
    nvenc.reset_probes()


def test_nvenc_import_raising_runtime_error(tmp_path, monkeypatch, fresh_probes):
    """PyNvVideoCodec raises RuntimeError at import where libnvidia-encode is missing."""
    package = tmp_path / "PyNvVideoCodec"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise RuntimeError('libnvidia-encode.so.1: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "PyNvVideoCodec", raising=False)
    usable, reason = nvenc.nvenc_capability()
    assert not usable and "RuntimeError" in reason and "libnvidia-encode" in reason
    usable, reason = nvenc.nvdec_capability()
    assert not usable and "libnvidia-encode" in reason  # no extension module to fall back on


def test_nvenc_access_units_made_self_contained(small):
    frames, side = pack(small, PackSettings())
    unit = encode_x265(frames, side.layout, 20)[0]
    assert nvenc.self_contained(unit)
    idr_at = next(offset for offset, kind in nvenc.nal_units(unit) if kind in (nvenc.IDR_W_RADL, nvenc.IDR_N_LP))
    headers, body = unit[:idr_at], unit[idr_at:]
    session = types.SimpleNamespace(GetSequenceParams=lambda: headers)
    assert nvenc._with_headers(session, [body, unit]) == [unit, unit]  # headers put back
    trail = b"\x00\x00\x00\x01" + bytes([1 << 1, 1]) + bytes(12)  # a TRAIL_R (P) slice
    with pytest.raises(CodecError, match="not IDR"):
        nvenc._with_headers(session, [trail])


def test_nvenc_encode_without_the_flags_overload():
    class OneArgument:
        def Encode(self, frame):
            return [{"data": b"\x00\x00\x01\x40\x01", "timestamp": 0, "picture_type": 0}]

    assert nvenc._access_units(nvenc._encode_one(OneArgument(), np.zeros(3, np.uint8), 6)) == [b"\x00\x00\x01\x40\x01"]
    assert nvenc._access_units(b"") == [] and nvenc._access_units(None) == []


# --------------------------------------------------------------------------- a stand-in PyNvVideoCodec


class _FakeEncoder:
    """Behaves like PyNvEncoder for CPU buffers: holds frames back (the SDK's output
    delay), hands them out on EndEncode, as lists of {'data', 'timestamp', 'picture_type'}.
    The access units are real: x265 at the session's QP."""

    opened = 0

    def __init__(self, width, height, fmt, cpu, **kwargs):
        assert fmt == "YUV444" and cpu is True
        assert all(isinstance(v, str) for v in kwargs.values())
        assert kwargs["rc"] == "constqp" and kwargs["gop"] == "1" and kwargs["bf"] == "0"
        self.width, self.height, self.qp = width, height, int(kwargs["constqp"])
        self.pending: list[np.ndarray] = []
        _FakeEncoder.opened += 1

    def Encode(self, frame, flags=0):
        assert isinstance(frame, np.ndarray) and frame.shape == (3, self.height, self.width)
        self.pending.append(frame.copy())
        return []

    def EndEncode(self):
        layout = types.SimpleNamespace(planes=3, width=self.width, height=self.height, frames=len(self.pending))
        units = encode_x265(self.pending, layout, self.qp) if self.pending else []
        self.pending = []
        return [{"data": u, "timestamp": i, "picture_type": 0} for i, u in enumerate(units)]


class _View:
    def __init__(self, array: np.ndarray):
        self.shape, self.stride = list(array.shape), [array.strides[0], 1]


class _FakePicture:
    def __init__(self, planes: np.ndarray):
        self.planes = [np.ascontiguousarray(p) for p in planes]

    def cuda(self):
        return [_View(p) for p in self.planes]

    def GetPtrToPlane(self, i):
        return self.planes[i].ctypes.data


class _FakeDecoder:
    """PyNvDecoder with host output: reads each PacketData's bytes through its pointer."""

    def __init__(self, **kwargs):
        import av

        assert kwargs["usedevicememory"] is False
        self.ctx = av.CodecContext.create("hevc", "r")
        self.av = av

    def Decode(self, packet):
        if packet.bsl == 0:
            pictures = self.ctx.decode(None)
        else:
            data = ctypes.string_at(packet.bsl_data, packet.bsl)
            pictures = self.ctx.decode(self.av.Packet(data))
        return [_FakePicture(p.to_ndarray()) for p in pictures]


def _fake_nvc(fail_encoder: str | None = None) -> types.ModuleType:
    nvc = types.ModuleType("PyNvVideoCodec")

    def create_encoder(width, height, fmt, cpu, **kwargs):
        if fail_encoder:
            raise RuntimeError(fail_encoder)
        return _FakeEncoder(width, height, fmt, cpu, **kwargs)

    class PacketData:
        bsl = 0
        bsl_data = 0
        pts = 0
        decode_flag = 0

    nvc.CreateEncoder = create_encoder
    nvc.CreateDecoder = lambda **kwargs: _FakeDecoder(**kwargs)
    nvc.GetDecoderCaps = lambda **kwargs: {"supported": 1, "width_max": 8192, "height_max": 8192,
                                           "num_decoder_engines": 7}
    nvc.PacketData = PacketData
    nvc.NV_ENC_PIC_FLAGS = types.SimpleNamespace(FORCEIDR=2, OUTPUT_SPSPPS=4)
    nvc.cudaVideoCodec = types.SimpleNamespace(HEVC=8)
    nvc.cudaVideoChromaFormat = types.SimpleNamespace(__members__={"Monochrome": 0, "cudaVideoChromaFormat_444": 3})
    nvc.OutputColorType = types.SimpleNamespace(NATIVE=0)
    nvc.DisplayDecodeLatencyType = types.SimpleNamespace(LOW=1)
    nvc.VideoPacketFlag = types.SimpleNamespace(ENDOFPICTURE=2)
    return nvc


def test_nvenc_encoder_without_a_session_says_why(monkeypatch, fresh_probes):
    """As on an H100: the module imports, opening a session fails (error 2)."""
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", _fake_nvc(
        fail_encoder="nvEncOpenEncodeSessionEx(&encodeSessionExParams, &hEncoder) returned error 2"))
    usable, reason = nvenc.nvenc_capability()
    assert not usable and "error 2" in reason
    with pytest.raises(CodecError, match="error 2"):
        get("nvenc")
    assert nvenc.nvdec_capability()[0]  # NVDEC is separate


def test_nvenc_with_stand_in_module(monkeypatch, fresh_probes, small):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", _fake_nvc())
    assert nvenc.nvenc_capability() == (True, "NVENC HEVC 4:4:4 session opened on GPU 0")
    assert "nvenc" in available()
    _FakeEncoder.opened = 0
    with get("nvenc") as codec:
        x = small.to(torch.bfloat16)
        first = codec.encode(x)
        second = codec.encode(x * 2)  # same frame size and QP: the session is reused
        assert _FakeEncoder.opened == 1 and len(codec._sessions) == 1
        codec_qp = get("nvenc", qp=30)
        codec_qp.encode(x)
        assert _FakeEncoder.opened == 2
        y = codec.decode(as_bytes_message(first))
        assert codec.last_decoder == "nvdec"  # through the stand-in NVDEC and _host_planes
        assert first.header["codec"] == "nvenc" and abs(rel_l2(y, x) - first.header["rel_err_measured"]) < 1e-9
        assert torch.equal(bits(y), bits(get("x265").decode(with_header(as_bytes_message(first), codec="x265"))))
        check_x265_message(x * 2, second)
    assert not codec._sessions  # closed on leaving the block
    nvenc.close_all()
    assert not codec_qp._sessions


def test_nvenc_measure_error_off_states_a_priori_bound(monkeypatch, fresh_probes, small):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", _fake_nvc())
    message = get("nvenc", measure_error=False).encode(small)
    assert "rel_err_measured" not in message.header
    y = decode(message)
    assert rel_l2(y, small) <= message.rel_err_bound


# --------------------------------------------------------------------------- real hardware


def test_nvenc_on_a_real_gpu(small):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: NVENC/NVDEC tests need an NVIDIA GPU")
    nvenc.reset_probes()
    usable, reason = nvenc.nvenc_capability()
    if not usable:
        pytest.skip(f"no NVENC here: {reason}")
    with get("nvenc") as codec:
        message = codec.encode(small)
        y = codec.decode(message)
    assert rel_l2(y, small) <= message.rel_err_bound
    software = decode_hevc_software(parse_message(message, "nvenc").packets, parse_message(message, "nvenc").side.layout)
    assert len(software) == message.header["n_frames"]
