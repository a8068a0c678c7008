"""Tests for splitter/checkpoint.py: selective reads, validation, HF cache, memory.

Everything runs on CPU with files in tmp_path; the Hugging Face tests use a fake
hub cache in the library's real on-disk layout and never touch the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from comfy_mesh.splitter.checkpoint import (
    CheckpointError,
    SafetensorsCheckpoint,
    resolve_checkpoint,
    tqdm_progress,
    write_safetensors,
)

PREFIX = "model.diffusion_model."


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "double_blocks.0.img_attn.qkv.weight": torch.randn(24, 8, generator=g).to(torch.bfloat16),
        "double_blocks.0.img_attn.qkv.bias": torch.randn(24, generator=g).to(torch.float16),
        "double_blocks.1.img_mlp.0.weight": torch.randn(16, 8, generator=g),
        "single_blocks.0.linear1.weight": torch.randn(4, 4, generator=g).double(),
        "single_blocks.0.norm.scale": torch.randn(8, generator=g).to(torch.bfloat16),
        "img_in.weight": torch.randint(-100, 100, (3, 5), generator=g, dtype=torch.int64),
        "step_ids": torch.randint(-100, 100, (7,), generator=g, dtype=torch.int32),
        "codes": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "bytes": torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 5),
    }


def _write(path: pathlib.Path, prefix: str = "", metadata: dict | None = None) -> dict[str, torch.Tensor]:
    tensors = _tensors()
    write_safetensors(path, {prefix + k: v for k, v in tensors.items()}, metadata=metadata)
    return tensors


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_round_trip_subset(tmp_path, prefix):
    path = tmp_path / "model.safetensors"
    ref = _write(path, prefix, metadata={"format": "pt", "note": "x"})
    wanted = [
        "single_blocks.0.norm.scale",  # requested out of file order on purpose
        "double_blocks.0.img_attn.qkv.weight",
        "mask",
        "scalar",
        "empty",
        "img_in.weight",
    ]
    calls = []
    with SafetensorsCheckpoint(path) as ck:
        assert ck.prefix == prefix
        assert sorted(ck.logical_keys()) == sorted(ref)
        assert sorted(ck.keys()) == sorted(prefix + k for k in ref)
        assert ck.metadata == {"format": "pt", "note": "x"}
        assert ck.dtype("double_blocks.0.img_attn.qkv.weight") == torch.bfloat16
        assert ck.shape("double_blocks.0.img_attn.qkv.weight") == (24, 8)
        assert ck.nbytes("double_blocks.0.img_attn.qkv.weight") == 24 * 8 * 2
        out = ck.load(wanted, progress=lambda done, total, key: calls.append((done, total, key)))
    assert list(out) == wanted  # only what was asked, in request order
    for k in wanted:
        assert _same(out[k], ref[k]), k
    total = sum(ref[k].numel() * ref[k].element_size() for k in wanted)
    assert len(calls) == len(wanted)
    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and dones[-1] == total
    assert all(c[1] == total for c in calls)
    assert sorted(c[2] for c in calls) == sorted(wanted)


def test_every_dtype_round_trips(tmp_path):
    path = tmp_path / "m.safetensors"
    ref = _write(path)
    with SafetensorsCheckpoint(path) as ck:
        out = ck.load(ck.logical_keys())
    assert set(out) == set(ref)
    for k, v in ref.items():
        assert _same(out[k], v), k


def test_cast_and_device(tmp_path):
    path = tmp_path / "m.safetensors"
    ref = _write(path, PREFIX)
    with SafetensorsCheckpoint(path) as ck:
        out = ck.load(["double_blocks.0.img_attn.qkv.weight"], dtype=torch.float32, device="cpu")
    t = out["double_blocks.0.img_attn.qkv.weight"]
    assert t.dtype == torch.float32 and t.device.type == "cpu"
    assert torch.equal(t, ref["double_blocks.0.img_attn.qkv.weight"].float())


def test_loaded_tensors_are_writable_and_independent(tmp_path):
    path = tmp_path / "m.safetensors"
    ref = _write(path)
    with SafetensorsCheckpoint(path) as ck:
        a = ck.load("double_blocks.1.img_mlp.0.weight")["double_blocks.1.img_mlp.0.weight"]
    a.add_(1.0)  # the file is closed; the tensor owns its memory
    assert torch.equal(a, ref["double_blocks.1.img_mlp.0.weight"] + 1.0)


def test_prefix_detection_with_markers(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path, PREFIX)
    with SafetensorsCheckpoint(path, markers=["double_blocks.0.img_attn.qkv.weight", "single_blocks."]) as ck:
        assert ck.prefix == PREFIX
        assert ck.detect_prefix("img_in.weight") == PREFIX
        with pytest.raises(CheckpointError, match="right model file"):
            ck.detect_prefix(["transformer_blocks.0.attn1.to_q.weight"])
    with pytest.raises(CheckpointError, match="prefix"):
        SafetensorsCheckpoint(path, prefix="diffusion_model.")
    # a forced empty prefix exposes the raw names
    with SafetensorsCheckpoint(path, prefix="") as ck:
        assert PREFIX + "img_in.weight" in ck.logical_keys()


def test_unknown_key_lists_close_matches(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path, PREFIX)
    with SafetensorsCheckpoint(path) as ck:
        with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_attn\.qkv\.weight"):
            ck.load(["double_blocks.0.img_attn.qkv.weigth"])
        with pytest.raises(CheckpointError, match="without the prefix"):
            ck.load([PREFIX + "img_in.weight"])
        with pytest.raises(CheckpointError):
            ck.shape("nope")


def test_closed_checkpoint_refuses_reads(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path)
    ck = SafetensorsCheckpoint(path)
    ck.close()
    with pytest.raises(CheckpointError, match="closed"):
        ck.load(["mask"])


def test_tqdm_progress_callable(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path)
    bar = tqdm_progress("loading", force=False)
    with SafetensorsCheckpoint(path) as ck:
        out = ck.load(ck.logical_keys(), progress=bar)
    assert len(out) == len(_tensors())
    assert bar._bar is None  # closed itself when done == total


# --------------------------------------------------------------------------- corruption


def _raw_file(path: pathlib.Path, header: dict | bytes, data: bytes = b"") -> None:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def _corrupt_cases(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"a": torch.randn(64, 64), "b": torch.randn(32)})
    blob = good.read_bytes()
    hlen = struct.unpack("<Q", blob[:8])[0]
    cases = {}

    def case(name: str, content: bytes) -> None:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        cases[name] = p

    case("truncated_mid_data", blob[: 8 + hlen + (len(blob) - 8 - hlen) // 2])
    case("truncated_in_header", blob[: 8 + hlen // 2])
    case("tiny", blob[:5])
    case("empty", b"")
    case("garbage_length", struct.pack("<Q", 2**62) + blob[8:])
    case("zero_length", struct.pack("<Q", 0) + blob[8:])
    case("non_json", struct.pack("<Q", hlen) + b"\xff" * hlen + blob[8 + hlen:])
    case("json_list", struct.pack("<Q", 2) + b"[]")
    p = tmp_path / "past_eof.safetensors"
    _raw_file(p, {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 100)
    cases["past_eof"] = p
    p = tmp_path / "bad_offsets.safetensors"
    _raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8)
    cases["bad_offsets"] = p
    p = tmp_path / "size_mismatch.safetensors"
    _raw_file(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    cases["size_mismatch"] = p
    p = tmp_path / "no_dtype.safetensors"
    _raw_file(p, {"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    cases["no_dtype"] = p
    p = tmp_path / "neg_shape.safetensors"
    _raw_file(p, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)
    cases["neg_shape"] = p
    p = tmp_path / "entry_not_object.safetensors"
    _raw_file(p, {"a": 5}, b"")
    cases["entry_not_object"] = p
    return cases


CORRUPT_CASES = [
    "truncated_mid_data", "truncated_in_header", "tiny", "empty", "garbage_length", "zero_length",
    "non_json", "json_list", "past_eof", "bad_offsets", "size_mismatch", "no_dtype", "neg_shape",
    "entry_not_object",
]


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_corrupt_files_raise_checkpoint_error(tmp_path, case):
    path = _corrupt_cases(tmp_path)[case]
    # pytest.raises(CheckpointError) lets any other exception type fail the test.
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        SafetensorsCheckpoint(path)
    assert str(path) in str(info.value)
    assert "re-download" in str(info.value)


def test_truncated_mid_data_names_the_tensor(tmp_path):
    path = _corrupt_cases(tmp_path)["truncated_mid_data"]
    with pytest.raises(CheckpointError, match=r"tensor '(a|b)' needs bytes"):
        SafetensorsCheckpoint(path)


def test_unsupported_dtype_fails_on_use_not_on_open(tmp_path):
    path = tmp_path / "odd.safetensors"
    _raw_file(
        path,
        {
            "weird": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
            "ok": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
        },
        b"\x01\x02\x03\x04",
    )
    with SafetensorsCheckpoint(path) as ck:
        assert torch.equal(ck.load(["ok"])["ok"], torch.tensor([3, 4], dtype=torch.uint8))
        with pytest.raises(CheckpointError, match="F4"):
            ck.dtype("weird")
        with pytest.raises(CheckpointError, match="F4"):
            ck.load(["ok", "weird"])


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SafetensorsCheckpoint(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    a, b, c, d = (tmp_path / f"{n}.safetensors" for n in "abcd")
    ref = _write(a, PREFIX, metadata={"who": "one"})
    write_safetensors(b, ref, metadata={"who": "two"})  # no prefix, other metadata
    changed = dict(ref)
    changed["double_blocks.1.img_mlp.0.weight"] = ref["double_blocks.1.img_mlp.0.weight"] + 1e-3
    write_safetensors(c, changed)
    extra = dict(ref)
    extra["final_layer.linear.weight"] = torch.zeros(2)
    write_safetensors(d, extra)
    with SafetensorsCheckpoint(a) as ca, SafetensorsCheckpoint(b) as cb:
        fa, fb = ca.fingerprint(), cb.fingerprint()
        assert fa == ca.fingerprint()
    assert fa == fb and len(fa) == 64
    with SafetensorsCheckpoint(c) as cc, SafetensorsCheckpoint(d) as cd:
        assert cc.fingerprint() != fa
        assert cd.fingerprint() != fa


def test_fingerprint_reads_little_of_a_large_file(tmp_path):
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {f"blocks.{i}.w": torch.full((1024, 1024), float(i)) for i in range(40)})  # 160 MiB
    with SafetensorsCheckpoint(path) as ck:
        calls = []
        orig = ck._readinto_at

        def spy(offset, view):
            calls.append(view.nbytes)
            return orig(offset, view)

        ck._readinto_at = spy
        ck.fingerprint()
    assert sum(calls) <= 32 * 2 * 64 * 1024


# --------------------------------------------------------------------------- resolve


def test_resolve_local_paths(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path)
    assert resolve_checkpoint(str(path)) == path
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="directory.*m.safetensors"):
        resolve_checkpoint(str(tmp_path))
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="git-LFS pointer"):
        resolve_checkpoint(str(lfs))
    pt = tmp_path / "model.ckpt"
    pt.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="pickle"):
        resolve_checkpoint(str(pt))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        resolve_checkpoint(str(junk))


def _fake_hub_cache(root: pathlib.Path, repo_id: str, files: dict[str, bytes], *, symlinks: bool = True) -> str:
    """Lay out `files` as huggingface_hub's cache holds them; return the commit hash.

    models--ORG--NAME/blobs/<sha256>, refs/main holding the commit hash (no newline,
    as the hub writes it), snapshots/<commit>/<path> -> ../../blobs/<sha256>.
    """
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "blobs").mkdir()
    for name, content in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        snap = repo_dir / "snapshots" / commit / name
        snap.parent.mkdir(parents=True, exist_ok=True)
        if symlinks:
            snap.symlink_to(os.path.relpath(blob, snap.parent))
        else:
            snap.write_bytes(content)
    return commit


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once at import; is_offline_mode() returns the constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path):
    src = tmp_path / "src.safetensors"
    ref = _write(src, PREFIX)
    content = src.read_bytes()
    cache = tmp_path / "hub"
    commit = _fake_hub_cache(
        cache, "acme/tiny-flux", {"tiny.safetensors": content, "transformer/tiny.safetensors": content}
    )
    return cache, commit, ref, content


def test_resolve_hf_from_local_cache(offline, hub_cache):
    cache, commit, ref, content = hub_cache
    for spec in (
        "hf://acme/tiny-flux/tiny.safetensors",
        "hf://acme/tiny-flux@main/tiny.safetensors",
        f"hf://acme/tiny-flux@{commit}/tiny.safetensors",
        "hf://acme/tiny-flux/transformer/tiny.safetensors",
    ):
        path = resolve_checkpoint(spec, cache_dir=cache)
        assert commit in str(path), spec
        assert path.read_bytes() == content
        with SafetensorsCheckpoint(path) as ck:
            assert _same(ck.load(["img_in.weight"])["img_in.weight"], ref["img_in.weight"])


def test_resolve_hf_missing_file_offline(offline, hub_cache):
    cache, _, _, _ = hub_cache
    with pytest.raises(CheckpointError, match="not in the local cache") as info:
        resolve_checkpoint("hf://acme/tiny-flux/other.safetensors", cache_dir=cache)
    assert "hf download acme/tiny-flux other.safetensors" in str(info.value)
    with pytest.raises(CheckpointError, match="not in the local cache"):
        resolve_checkpoint("hf://acme/unknown-repo/tiny.safetensors", cache_dir=cache)
    with pytest.raises(CheckpointError, match="not in the local cache"):
        resolve_checkpoint("hf://acme/tiny-flux@v2/tiny.safetensors", cache_dir=cache)


def test_offline_env_set_after_import_is_honoured(monkeypatch, hub_cache):
    """HF_HUB_OFFLINE set after huggingface_hub was imported still means no network."""
    import huggingface_hub
    import huggingface_hub.constants

    cache, _, _, _ = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    assert resolve_checkpoint("hf://acme/tiny-flux/tiny.safetensors", cache_dir=cache).is_file()
    with pytest.raises(CheckpointError, match="not in the local cache"):
        resolve_checkpoint("hf://acme/tiny-flux/absent.safetensors", cache_dir=cache)
    assert seen == [True, True]


def test_resolve_hf_copied_files_cache(offline, tmp_path):
    """Windows without developer mode stores real files in snapshots/, not symlinks."""
    src = tmp_path / "src.safetensors"
    _write(src)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "acme/win", {"m.safetensors": src.read_bytes()}, symlinks=False)
    assert resolve_checkpoint("hf://acme/win/m.safetensors", cache_dir=cache).read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    "spec",
    ["hf://acme", "hf://acme/repo", "hf://acme/repo/", "hf://acme/repo@/f.safetensors", "hf:///repo/f.safetensors"],
)
def test_bad_hf_specs(offline, tmp_path, spec):
    with pytest.raises(CheckpointError, match="hf://ORG/REPO"):
        resolve_checkpoint(spec, cache_dir=tmp_path)


# --------------------------------------------------------------------------- memory


_MEMORY_PROBE = textwrap.dedent(
    r"""
    import json, os, resource, sys, time
    import torch
    from comfy_mesh.splitter.checkpoint import SafetensorsCheckpoint

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def rchar():
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
        raise RuntimeError("rchar")

    path, n_blocks, n_load = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ck = SafetensorsCheckpoint(path)
    ck.load(["small.0"])  # warm-up: first-touch costs of the code path, not of the tensors
    names = [k for i in range(n_blocks - n_load, n_blocks) for k in (f"blocks.{i}.weight", f"blocks.{i}.bias")]
    want = sum(ck.nbytes(k) for k in names)

    # Reset the peak-RSS watermark to the current RSS where the kernel allows it
    # (clear_refs "5", Linux >= 4.0); otherwise the earlier peak stays in VmHWM and
    # the measured increase can only be larger (the assertion stays conservative).
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    base_rss = status("VmRSS")
    r0 = rchar()
    t0 = time.perf_counter()
    out = ck.load(names)
    dt = time.perf_counter() - t0
    peak = status("VmHWM")
    r1 = rchar()
    ok = all(float(out[f"blocks.{i}.weight"][0, 0]) == i and float(out[f"blocks.{i}.weight"][-1, -1]) == i
             for i in range(n_blocks - n_load, n_blocks))
    print(json.dumps({
        "want": want, "base_rss": base_rss, "peak": peak, "increase": peak - base_rss,
        "read": r1 - r0, "seconds": dt, "hwm_reset": reset, "values_ok": ok,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/{status,io}")
def test_loading_a_few_blocks_costs_only_their_bytes(tmp_path):
    n_blocks, n_load, side = 12, 3, 2560  # 12 x 25 MiB fp32 blocks: ~315 MB file
    path = tmp_path / "blocks.safetensors"
    tensors = {}
    for i in range(n_blocks):
        tensors[f"blocks.{i}.weight"] = torch.full((side, side), float(i))
        tensors[f"blocks.{i}.bias"] = torch.full((side,), float(i))
    for i in range(4):
        tensors[f"small.{i}"] = torch.zeros(64)
    write_safetensors(path, tensors)
    del tensors
    file_size = path.stat().st_size

    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path), str(n_blocks), str(n_load)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"\nloaded {m['want'] / 2**20:.1f} MiB of a {file_size / 2**20:.1f} MiB file: peak RSS +"
        f"{m['increase'] / 2**20:.1f} MiB (ratio {m['increase'] / m['want']:.3f}), read {m['read'] / 2**20:.1f} MiB, "
        f"{m['want'] / 1e6 / m['seconds']:.0f} MB/s (page cache warm), hwm reset: {m['hwm_reset']}"
    )
    assert m["values_ok"]
    # 16 MiB of slack covers what is not the tensors themselves: malloc arena and
    # page-table growth, Python objects and the dict, and the kernel's accounting of
    # RSS in 64-page batches per CPU; it is under 1/4 of the 75 MiB loaded here.
    slack = 16 * 2**20
    assert m["increase"] <= 1.2 * m["want"] + slack, m
    # The tensors really were materialised (pages touched), not left lazy.
    assert m["increase"] >= 0.9 * m["want"], m
    # Never reads the whole checkpoint: only the requested tensors (and no more than
    # a little beyond them) pass through read().
    assert m["want"] <= m["read"] < 0.5 * file_size, m
    assert m["read"] <= m["want"] + 2**20, m


def test_header_length_starting_with_a_pickle_byte_is_still_safetensors(tmp_path):
    # Regression: a header 0x...80 bytes long starts the file with 0x80, pickle's magic byte.
    import json
    import struct

    from comfy_mesh.splitter.checkpoint import resolve_checkpoint

    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    text = json.dumps(header).encode()
    text += b" " * (0x180 - len(text))
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0\0\0\0")
    assert path.read_bytes()[:1] == b"\x80"
    assert resolve_checkpoint(str(path)) == path
