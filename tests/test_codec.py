"""Codecs: exact raw round trips, the cpu codec's accuracy and its hard error bound,
and that damaged or foreign messages fail with CodecError and nothing else."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import zstandard

from comfy_mesh.codec import Codec, CodecError, EncodedTensor, available, decode, get
from comfy_mesh.codec.cpu import CpuSettings, unpack
from comfy_mesh.codec.synthetic import ActivationShape, activation_like

from codec_messages import with_buffer, with_header

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Unit roundoff of the cast back to each dtype (what the cpu bound adds for it).
CAST_U = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SPEC = ActivationShape()  # 4608 x 256


@pytest.fixture(scope="module")
def activations() -> torch.Tensor:
    return activation_like(SPEC, seed=0)


def as_bytes_message(message: EncodedTensor) -> EncodedTensor:
    """What a receiver holds: the header through JSON, every buffer as read-only bytes."""
    return EncodedTensor(json.loads(message.header_bytes()), [bytes(memoryview(b)) for b in message.buffers])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so equality is bitwise (distinguishes -0.0, NaN payloads)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def rel_l2(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y.double() - x.double()).norm() / x.double().norm())


# --------------------------------------------------------------------------- registry


def test_available_lists_the_backends_usable_here():
    assert {"cpu", "gpu", "raw"} <= set(available()) and available() == sorted(available())
    for name in available():
        codec = get(name)
        assert isinstance(codec, Codec)
        assert codec.name == name


def test_get_unknown_name_lists_available():
    with pytest.raises(CodecError) as err:
        get("nvenc-typo")
    assert "nvenc-typo" in str(err.value)
    assert "cpu" in str(err.value) and "raw" in str(err.value)


@pytest.mark.parametrize("name, settings, word", [
    ("cpu", {"qualty": 6}, "qualty"),
    ("cpu", {"quality": 6, "level": 3}, "level"),
    ("raw", {"quality": 6}, "quality"),
])
def test_get_unknown_setting_is_named(name, settings, word):
    with pytest.raises(CodecError) as err:
        get(name, **settings)
    assert repr(word) in str(err.value)


@pytest.mark.parametrize("settings", [
    {"quality": 0}, {"quality": -1.0}, {"quality": float("nan")}, {"quality": "6"}, {"quality": True},
    {"outlier_sigma": 0}, {"outlier_sigma": float("inf")}, {"zstd_level": 23}, {"zstd_level": 3.0},
    {"stats_tokens": -1}, {"quality": 1e6, "outlier_sigma": 1e4},
])
def test_get_bad_setting_value(settings):
    with pytest.raises(CodecError):
        get("cpu", **settings)


def test_get_settings_are_applied():
    codec = get("cpu", quality=10, outlier_sigma=5, zstd_level=1, stats_tokens=0)
    assert (codec.settings.quality, codec.settings.outlier_sigma) == (10.0, 5.0)
    assert (codec.settings.zstd_level, codec.settings.stats_tokens) == (1, 0)


# --------------------------------------------------------------------------- raw


RAW_SHAPES = [(7,), (2, 5, 9), (257, 131), (), (0, 4), (3, 1, 1)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", RAW_SHAPES)
def test_raw_round_trip_is_bit_exact(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 100).to(dtype)
    message = get("raw").encode(x)
    assert message.header == {
        "codec": "raw", "v": 1, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
        "rel_err_bound": 0.0,
    }
    assert len(message.buffers) == 1
    assert message.nbytes == len(message.header_bytes()) + x.numel() * x.element_size()
    assert message.rel_err_bound == 0.0
    y = decode(as_bytes_message(message))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(bits(y), bits(x))


def test_raw_encodes_without_copy_and_read_only():
    x = torch.randn(64, 32)
    (buf,) = get("raw").encode(x).buffers
    assert buf.readonly
    assert np.frombuffer(buf, dtype=np.float32).ctypes.data == x.data_ptr()


def test_raw_non_contiguous_and_grad_inputs():
    x = torch.randn(16, 24, requires_grad=True)
    y = decode(get("raw").encode(x.t()))
    assert torch.equal(y, x.detach().t())
    assert y.is_contiguous() and not y.requires_grad


def test_raw_decode_is_new_writable_memory():
    x = torch.randn(10, 12).to(torch.bfloat16)
    message = as_bytes_message(get("raw").encode(x))
    y = decode(message, device="cpu")
    y.add_(1)  # must not raise: the result owns writable memory
    assert torch.equal(y, x + 1)
    assert y.device.type == "cpu"


def test_raw_refuses_other_dtypes():
    with pytest.raises(CodecError, match="int64"):
        get("raw").encode(torch.arange(5))
    with pytest.raises(CodecError):
        get("raw").encode(np.zeros(3, np.float32))


# --------------------------------------------------------------------------- cpu accuracy


def check_cpu_message(x: torch.Tensor, message: EncodedTensor, y: torch.Tensor, sigma: float, quality: float):
    """Everything the cpu codec promises about one encoded tensor."""
    assert y.dtype == x.dtype and y.shape == x.shape
    p = unpack(message)
    channels = x.shape[-1]
    x32 = x.float().reshape(-1, channels)
    y32 = y.float().reshape(-1, channels)
    c = torch.from_numpy(p.centers)
    step = torch.from_numpy(p.steps)
    idx = torch.from_numpy(p.outlier_index)

    # Outliers come back exactly, and they are exactly the values beyond the threshold.
    assert message.header["n_outliers"] == idx.numel()
    assert torch.equal(bits(y.reshape(-1)[idx]), bits(x.reshape(-1)[idx]))
    is_outlier = torch.zeros(x32.numel(), dtype=torch.bool)
    is_outlier[idx] = True
    is_outlier = is_outlier.reshape(x32.shape)
    dist = (x32 - c).abs() / (step * quality)  # in robust spreads
    live = step > 0
    assert bool((dist[is_outlier & live] > sigma * (1 - 1e-5)).all())
    assert bool((dist[~is_outlier & live] <= sigma * (1 + 1e-5)).all())
    # Constant channels are exact and carry no outliers.
    assert torch.equal(y32[:, ~live], x32[:, ~live])
    assert not bool(is_outlier[:, ~live].any())

    # Element-wise: half a step, plus float32 arithmetic, plus the cast to the dtype.
    err = (y32.double() - x32.double()).abs()
    limit = (
        (step / 2).double()
        + 2.0**-21 * (x32.abs() + c.abs() + step).double()
        + CAST_U[x.dtype] * (x32.abs() + step).double()
        + 2.0**-24
    )
    assert bool((err <= limit).all()), float((err - limit).max())

    # And the hard relative L2 bound in the header.
    assert 0 < message.rel_err_bound < 1
    assert rel_l2(y, x) <= message.rel_err_bound


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_error_within_bounds(activations, dtype):
    x = activations.to(dtype)
    message = get("cpu").encode(x)
    y = decode(as_bytes_message(message))
    check_cpu_message(x, message, y, sigma=8.0, quality=CpuSettings().quality)
    # The loud tokens must have produced outliers: they are what min/max scaling loses.
    assert message.header["n_outliers"] >= SPEC.loud_tokens * SPEC.channels // 2


def test_cpu_ratio_and_error_at_default_quality(activations):
    x = activations.to(torch.bfloat16)
    message = get("cpu").encode(x)
    ratio = x.numel() * 2 / message.nbytes
    err = rel_l2(decode(message), x)
    assert ratio >= 3.0, ratio
    assert err <= 0.05, err
    assert message.rel_err_bound <= 0.05


def test_cpu_higher_quality_is_more_accurate_and_larger(activations):
    x = activations.to(torch.bfloat16)
    results = []
    for quality in (4, 6, 8, 12):
        message = get("cpu", quality=quality).encode(x)
        results.append((message.nbytes, rel_l2(decode(message), x), message.rel_err_bound))
    sizes, errors, bounds = zip(*results)
    assert list(sizes) == sorted(sizes) and len(set(sizes)) == 4
    assert list(errors) == sorted(errors, reverse=True) and len(set(errors)) == 4
    assert list(bounds) == sorted(bounds, reverse=True)
    assert all(e <= b for e, b in zip(errors, bounds))


def test_cpu_full_statistics_match_sampled_closely(activations):
    sampled = get("cpu").encode(activations)
    full = get("cpu", stats_tokens=0).encode(activations)
    check_cpu_message(activations, full, decode(full), sigma=8.0, quality=CpuSettings().quality)
    assert abs(sampled.nbytes / full.nbytes - 1) < 0.05
    assert abs(sampled.rel_err_bound / full.rel_err_bound - 1) < 0.1


def test_cpu_wide_symbols_use_int16(activations):
    message = get("cpu", quality=40).encode(activations)
    assert message.header["qdtype"] == "int16"
    check_cpu_message(activations, message, decode(message), sigma=8.0, quality=40.0)
    assert get("cpu").encode(activations).header["qdtype"] == "int8"


def test_cpu_zero_tensor_is_exact_with_zero_bound():
    x = torch.zeros(33, 17, dtype=torch.bfloat16)
    message = get("cpu").encode(x)
    assert message.rel_err_bound == 0.0
    assert message.header["n_outliers"] == 0
    assert torch.equal(decode(message), x)


def test_cpu_constant_channels_are_exact():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 12, generator=g)
    x[:, 3] = 5.25
    x[:, 7] = -1e-3
    message = get("cpu").encode(x)
    y = decode(message)
    assert torch.equal(y[:, 3], x[:, 3]) and torch.equal(y[:, 7], x[:, 7])
    check_cpu_message(x, message, y, sigma=8.0, quality=CpuSettings().quality)

    all_constant = torch.arange(12.0).expand(300, 12)
    message = get("cpu").encode(all_constant)
    assert message.rel_err_bound == 0.0
    assert torch.equal(decode(message), all_constant)


def test_cpu_sparse_channel_is_quantised_not_all_outliers():
    """A channel with a zero MAD but spread values gets a fallback step."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 8, generator=g)
    x[:700, 2] = 0.0  # more than half equals the median: MAD = 0
    message = get("cpu", stats_tokens=0).encode(x)
    p = unpack(message)
    assert p.steps[2] > 0
    assert message.header["n_outliers"] < 50
    check_cpu_message(x, message, decode(message), sigma=8.0, quality=CpuSettings().quality)


@pytest.mark.parametrize("shape", [(1000,), (2, 129, 40), (257, 131), (), (0, 8), (5, 0), (1, 64)])
def test_cpu_shapes(shape):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).to(torch.float16)
    message = get("cpu").encode(x)
    y = decode(as_bytes_message(message))
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel():
        assert rel_l2(y, x) <= message.rel_err_bound
    if x.shape and x.numel() and x.numel() // x.shape[-1] == 1:
        assert torch.equal(y, x)  # one token: every channel is constant


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2.0**70])
def test_cpu_refuses_non_finite_or_huge(bad):
    x = torch.randn(20, 10)
    x[3, 4] = bad
    with pytest.raises(CodecError):
        get("cpu").encode(x)


def test_cpu_float16_near_range_limit_stays_finite():
    x = torch.randn(500, 4) * 100
    x[:, 1] = 65504 - torch.rand(500) * 200  # crowded near float16's maximum
    x = x.to(torch.float16)
    message = get("cpu").encode(x)
    y = decode(message)
    assert torch.isfinite(y).all()
    check_cpu_message(x, message, y, sigma=8.0, quality=CpuSettings().quality)


def test_cpu_decode_returns_writable_tensor_from_bytes(activations):
    x = activations[:200].to(torch.bfloat16)
    y = decode(as_bytes_message(get("cpu").encode(x)), device=torch.device("cpu"))
    assert y.is_contiguous()
    before = y.clone()
    y.mul_(2)
    assert torch.equal(y, before * 2)


def test_cpu_encode_leaves_input_untouched(activations):
    x = activations.clone()
    get("cpu").encode(x)
    assert torch.equal(x, activations)


def test_header_is_json_and_nbytes_counts_everything(activations):
    message = get("cpu").encode(activations)
    assert set(message.header) == {
        "codec", "v", "shape", "dtype", "qdtype", "n_outliers", "rel_err_bound", "side_crc32"}
    assert json.loads(message.header_bytes()) == message.header
    assert message.nbytes == len(message.header_bytes()) + sum(len(bytes(b)) for b in message.buffers)
    assert len(message.buffers) == 5


# --------------------------------------------------------------------------- damage


@pytest.fixture(scope="module")
def cpu_message(activations) -> EncodedTensor:
    return as_bytes_message(get("cpu").encode(activations[:1024]))


@pytest.fixture(scope="module")
def raw_message() -> EncodedTensor:
    return as_bytes_message(get("raw").encode(torch.randn(40, 8).to(torch.bfloat16)))


def test_damage_fixture_decodes(cpu_message, raw_message):
    decode(cpu_message)
    decode(raw_message)
    assert cpu_message.header["n_outliers"] > 0  # so the outlier buffers are exercised


@pytest.mark.parametrize("i", range(5))
def test_cpu_truncated_buffer(cpu_message, i):
    data = cpu_message.buffers[i]
    with pytest.raises(CodecError):
        decode(with_buffer(cpu_message, i, data[:-1]))
    with pytest.raises(CodecError):
        decode(with_buffer(cpu_message, i, data + b"\0\0\0\0"))


def test_raw_truncated_buffer(raw_message):
    with pytest.raises(CodecError, match="truncated"):
        decode(with_buffer(raw_message, 0, raw_message.buffers[0][:-2]))


@pytest.mark.parametrize("message_name", ["cpu_message", "raw_message"])
def test_wrong_buffer_count(request, message_name):
    message = request.getfixturevalue(message_name)
    with pytest.raises(CodecError, match="buffers"):
        decode(EncodedTensor(message.header, message.buffers[:-1]))
    with pytest.raises(CodecError, match="buffers"):
        decode(EncodedTensor(message.header, message.buffers + [b""]))


@pytest.mark.parametrize("i", [2, 3])
def test_cpu_flipped_bytes_in_zstd_stream(cpu_message, i):
    data = cpu_message.buffers[i]
    positions = sorted({*range(min(24, len(data))), *range(max(0, len(data) - 8), len(data)),
                        *random.Random(i).sample(range(len(data)), min(60, len(data)))})
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 0x5A
        with pytest.raises(CodecError):
            decode(with_buffer(cpu_message, i, bytes(damaged)))


def test_cpu_garbage_stream(cpu_message):
    noise = random.Random(5).randbytes(len(cpu_message.buffers[2]))
    with pytest.raises(CodecError, match="zstd"):
        decode(with_buffer(cpu_message, 2, noise))


@pytest.mark.parametrize("i", [0, 1, 4])
def test_cpu_flipped_side_data_fails_crc(cpu_message, i):
    data = bytearray(cpu_message.buffers[i])
    data[len(data) // 3] ^= 0x01
    with pytest.raises(CodecError, match="CRC-32"):
        decode(with_buffer(cpu_message, i, bytes(data)))


def test_cpu_non_finite_side_data(cpu_message):
    """Even with a matching CRC (a buggy encoder), NaN and negative steps are refused."""
    from comfy_mesh.codec.cpu import _side_crc32

    def forged(i: int, value: float) -> EncodedTensor:
        message = with_buffer(cpu_message, i, np.float32(value).tobytes() + cpu_message.buffers[i][4:])
        b = message.buffers
        return with_header(message, side_crc32=_side_crc32(b[0], b[1], b[4]))

    for i in (0, 1, 4):
        with pytest.raises(CodecError, match="NaN or Inf"):
            decode(forged(i, float("nan")))
    with pytest.raises(CodecError, match="negative"):
        decode(forged(1, -1.0))


def test_cpu_outlier_positions_past_the_end(cpu_message):
    n = cpu_message.header["n_outliers"]
    numel = math.prod(cpu_message.header["shape"])
    gaps = np.full(n, numel // n + 1, dtype=np.uint32)
    stream = zstandard.ZstdCompressor().compress(gaps.tobytes())
    with pytest.raises(CodecError, match="past the end"):
        decode(with_buffer(cpu_message, 3, stream))


@pytest.mark.parametrize("message_name", ["cpu_message", "raw_message"])
def test_unknown_or_missing_codec(request, message_name):
    message = request.getfixturevalue(message_name)
    with pytest.raises(CodecError, match="available codecs: cpu, gpu, raw"):
        decode(with_header(message, codec="hevc"))
    with pytest.raises(CodecError):
        decode(with_header(message, codec=KeyError))
    with pytest.raises(CodecError):
        decode(with_header(message, codec=["cpu"]))


@pytest.mark.parametrize("message_name", ["cpu_message", "raw_message"])
def test_wrong_version(request, message_name):
    message = request.getfixturevalue(message_name)
    for version in (2, 0, "1", None, True, KeyError):
        with pytest.raises(CodecError, match="decodes version 1"):
            decode(with_header(message, v=version))


@pytest.mark.parametrize("changes", [
    {"shape": KeyError}, {"shape": "257x131"}, {"shape": [1024, -256]}, {"shape": [1024, 255]},
    {"shape": [1024, 256.0]}, {"shape": [2**40, 2**40]}, {"dtype": "float64"}, {"dtype": KeyError},
    {"qdtype": "int64"}, {"qdtype": "int16"}, {"n_outliers": -1}, {"n_outliers": 10**12},
    {"n_outliers": 0}, {"rel_err_bound": "small"}, {"rel_err_bound": float("nan")},
    {"side_crc32": KeyError}, {"side_crc32": 12345}, {"side_crc32": -1},
])
def test_cpu_bad_header_fields(cpu_message, changes):
    with pytest.raises(CodecError):
        decode(with_header(cpu_message, **changes))


@pytest.mark.parametrize("changes", [
    {"shape": [40, 9]}, {"shape": None}, {"dtype": "float32"}, {"dtype": 3},
])
def test_raw_bad_header_fields(raw_message, changes):
    with pytest.raises(CodecError):
        decode(with_header(raw_message, **changes))


@pytest.mark.parametrize("thing", [None, {"codec": "raw"}, b"bytes", EncodedTensor("header", [])])
def test_decode_refuses_non_messages(thing):
    with pytest.raises(CodecError):
        decode(thing)


def test_decode_refuses_non_buffers(raw_message):
    with pytest.raises(CodecError):
        decode(with_buffer(raw_message, 0, 12345))


def test_backend_refuses_other_codec_message(raw_message):
    with pytest.raises(CodecError, match="'raw'"):
        get("cpu").decode(raw_message)


def test_random_damage_is_always_refused(cpu_message):
    """Random flips, cuts and splices anywhere: CodecError, never another exception,
    and never a silently wrong tensor (flips that cancel out decode to the original)."""
    original = decode(cpu_message)
    rng = random.Random(6)
    outcomes = {"same": 0, "CodecError": 0}
    for _ in range(300):
        i = rng.randrange(5)
        data = bytearray(cpu_message.buffers[i])
        action = rng.choice(["flip", "cut", "splice"])
        if action == "flip" and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif action == "cut":
            data = data[: rng.randrange(len(data) + 1)]
        else:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        try:
            y = decode(with_buffer(cpu_message, i, bytes(data)))
        except CodecError:
            outcomes["CodecError"] += 1
        else:
            assert bytes(data) == bytes(cpu_message.buffers[i]) and torch.equal(y, original)
            outcomes["same"] += 1
    assert outcomes["CodecError"] >= 290
