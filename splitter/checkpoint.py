"""Find a `.safetensors` checkpoint and read only the tensors a node needs.

A node of the mesh hosts a range of transformer blocks, so it must never pay for
the whole checkpoint: FLUX.2 dev is about 64 GB in bf16, more than many of the
machines it runs on have as RAM. This module therefore

* resolves a checkpoint spec (a local path or `hf://org/repo[@rev]/file`) to a
  file on disk, through the Hugging Face cache when needed (`resolve_checkpoint`);
* parses and validates the safetensors header itself, so a truncated download is
  reported as such instead of as a crash deep inside a reader
  (`SafetensorsCheckpoint`);
* reads the requested tensors with plain positioned reads into freshly allocated
  tensors. It deliberately does not mmap: mapped file pages are counted in the
  process's RSS and stay there until the mapping goes, so an mmap-then-copy load
  peaks at twice the bytes it loads. With `read` the page cache holds the file
  bytes (reclaimable, not ours) and RSS grows by the tensors only;
* fingerprints a model cheaply, so two nodes can check they hold the same model
  without hashing tens of gigabytes (`SafetensorsCheckpoint.fingerprint`);
* writes safetensors files atomically (`write_safetensors`), for tests and the
  tiny-model generator.

Key names: checkpoints carry the BFL/ComfyUI names, sometimes under
`model.diffusion_model.`. The checkpoint detects that prefix and every name the
class takes or returns is a *logical* name, with the prefix removed, so model code
never cares which flavour of file it was given.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import pathlib
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "ProgressCallback",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "DEFAULT_PREFIXES",
    "resolve_checkpoint",
    "tqdm_progress",
    "write_safetensors",
]


class CheckpointError(ValueError):
    """A checkpoint cannot be found, opened or read; the text says what to do."""


#: `progress(done_bytes, total_bytes, logical_key)`, called after each tensor is read.
ProgressCallback = Callable[[int, int, str], None]

#: Where diffusion-model keys live in the files we meet: ComfyUI full checkpoints,
#: some conversions, and bare transformer files (BFL, HF single-file releases).
DEFAULT_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.", "")

#: safetensors itself refuses headers above 100 MB; a larger value is corruption.
MAX_HEADER_BYTES = 100_000_000

_HF_SCHEME = "hf://"

# safetensors dtype string -> torch dtype. The fp8 and unsigned entries exist only in
# recent torch builds, hence getattr; a dtype missing here fails when that tensor is
# used (not when the file is opened), so one exotic tensor does not block the rest.
_DTYPES: dict[str, torch.dtype] = {
    name: dt
    for name, dt in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dt is not None
}


# --------------------------------------------------------------------------- resolve


def resolve_checkpoint(spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Turn a checkpoint spec into the path of a safetensors file on this machine.

    `spec` is a local path, or `hf://ORG/REPO/path/in/repo.safetensors`, optionally
    pinned as `hf://ORG/REPO@REVISION/path...` (a branch, tag or commit; write a `/`
    inside a revision as `%2F`, e.g. `refs%2Fpr%2F3`). Hub files go through
    `huggingface_hub.hf_hub_download`, so the normal cache (or `cache_dir`) is used
    and reused. Offline mode (`HF_HUB_OFFLINE=1`) is honoured even if it was set
    after huggingface_hub was imported: then only the local cache is consulted.

    The file's first bytes are checked so that a git-LFS pointer, a pickle or a GGUF
    file is reported as what it is, not as a corrupt safetensors file later.
    """
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith(_HF_SCHEME):
        path = _resolve_hf(text, cache_dir=cache_dir)
    else:
        path = pathlib.Path(text).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"checkpoint file {str(path)!r} does not exist; give the path to a .safetensors file "
                f"or a Hugging Face reference such as hf://ORG/REPO/file.safetensors"
            )
        if path.is_dir():
            found = sorted(p.name for p in path.glob("*.safetensors"))[:5]
            hint = f" (it holds: {', '.join(found)})" if found else ""
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a directory{hint}; give the path of one .safetensors file"
            )
    _sniff_safetensors(path)
    return path


@dataclass(frozen=True)
class _HfRef:
    repo_id: str
    revision: str | None
    filename: str


def _parse_hf(spec: str) -> _HfRef:
    usage = "expected hf://ORG/REPO/path/in/repo.safetensors or hf://ORG/REPO@REVISION/path/in/repo.safetensors"
    parts = spec[len(_HF_SCHEME):].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise CheckpointError(f"bad Hugging Face reference {spec!r}: {usage}")
    org, repo_rev, filename = parts
    repo, sep, revision = repo_rev.partition("@")
    if not repo or (sep and not revision):
        raise CheckpointError(f"bad Hugging Face reference {spec!r}: {usage}")
    return _HfRef(
        repo_id=f"{org}/{repo}",
        revision=urllib.parse.unquote(revision) if revision else None,
        filename=filename,
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_offline() -> bool:
    """Offline per huggingface_hub's import-time constant OR the environment now.

    huggingface_hub reads HF_HUB_OFFLINE once, at import; a user (or a launcher) that
    sets it later would otherwise still get network calls.
    """
    from huggingface_hub import constants

    return bool(constants.is_offline_mode()) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _resolve_hf(spec: str, *, cache_dir: str | os.PathLike | None) -> pathlib.Path:
    ref = _parse_hf(spec)
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    offline = _hf_offline()
    rev_opt = f" --revision {ref.revision}" if ref.revision else ""
    cache_opt = f" --cache-dir {os.fspath(cache_dir)}" if cache_dir is not None else ""
    download_cmd = f"`hf download {ref.repo_id} {ref.filename}{rev_opt}{cache_opt}`"
    where = f"{ref.repo_id}@{ref.revision or 'main'}:{ref.filename}"
    logger.info("resolving %s (offline=%s)", where, offline)
    try:
        local = huggingface_hub.hf_hub_download(
            repo_id=ref.repo_id,
            filename=ref.filename,
            revision=ref.revision,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    except hf_errors.LocalEntryNotFoundError as exc:
        if offline:
            raise CheckpointError(
                f"{where} is not in the local cache and offline mode is on (HF_HUB_OFFLINE); "
                f"run once with network access, or fetch it with {download_cmd}"
            ) from exc
        raise CheckpointError(
            f"{where} is not in the local cache and the Hub could not be reached; check the network "
            f"(or proxy) and retry, or fetch it on a connected machine with {download_cmd}"
        ) from exc
    except hf_errors.GatedRepoError as exc:
        raise CheckpointError(
            f"{ref.repo_id} is gated: accept its licence on https://huggingface.co/{ref.repo_id} and log in "
            f"with `hf auth login` (or set HF_TOKEN), then retry"
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"repository {ref.repo_id} not found on the Hub (or it is private: log in with `hf auth login` "
            f"or set HF_TOKEN); check the spelling in {spec!r}"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise CheckpointError(
            f"revision {ref.revision!r} does not exist in {ref.repo_id}; use a branch, tag or commit of that repo"
        ) from exc
    except hf_errors.EntryNotFoundError as exc:
        raise CheckpointError(
            f"{ref.filename!r} is not a file of {ref.repo_id}@{ref.revision or 'main'}; list the repo's files "
            f"on https://huggingface.co/{ref.repo_id}/tree/{ref.revision or 'main'}"
        ) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise CheckpointError(f"the Hub refused {where}: {exc}; retry later or download it with {download_cmd}") from exc
    except (hf_errors.HFValidationError, ValueError) as exc:
        raise CheckpointError(f"bad Hugging Face reference {spec!r}: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"could not fetch {where}: {exc}; check disk space and the cache directory") from exc
    path = pathlib.Path(local)
    logger.info("%s -> %s", where, path)
    return path


def _sniff_safetensors(path: pathlib.Path) -> None:
    """Cheaply tell a safetensors file from the files people mistake for one."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    # A valid safetensors start wins: its 8-byte length may begin with any byte (0x80,
    # "PK", ...), so the other formats' signatures are only consulted when it fails.
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{":
        return
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{str(path)!r} is a git-LFS pointer, not the model: fetch the real file with `git lfs pull` "
            f"or download it with `hf download`"
        )
    if head.startswith(b"GGUF"):
        raise CheckpointError(f"{str(path)!r} is a GGUF file; comfy-mesh loads .safetensors checkpoints")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise CheckpointError(
            f"{str(path)!r} is a PyTorch pickle/zip checkpoint, not safetensors; convert it to .safetensors first"
        )
    if len(head) < 9:
        raise CheckpointError(f"{str(path)!r} is too short to be a safetensors file ({len(head)} bytes)")
    raise CheckpointError(
        f"{str(path)!r} is not a safetensors file (no valid header at its start); "
        f"re-download it or point at the right file"
    )


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: `begin`/`end` are absolute byte offsets in the file."""

    name: str
    dtype_str: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsCheckpoint:
    """One open `.safetensors` file: validated header, selective tensor reads.

    Use as a context manager (or call `close`). The header is parsed and checked on
    open, so a truncated or corrupt file fails here with a `CheckpointError` that
    says so. Names taken by `shape`, `dtype`, `nbytes`, `load` and returned by
    `logical_keys` are logical: the key prefix (`self.prefix`) removed.

    `prefix=None` auto-detects among `DEFAULT_PREFIXES` (using `markers`, key names
    that must exist, when given); pass a string to force one.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        prefix: str | None = None,
        markers: Sequence[str] = (),
    ) -> None:
        self.path = pathlib.Path(path)
        try:
            self._file = open(self.path, "rb", buffering=0)
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint file {str(self.path)!r} does not exist") from exc
        except OSError as exc:
            raise CheckpointError(f"cannot open checkpoint {str(self.path)!r}: {exc}") from exc
        self._lock = threading.Lock()
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            self._header_bytes, self._entries, self.metadata = self._parse_header()
            self.data_start = 8 + len(self._header_bytes)
            self.prefix = ""
            self.set_prefix(self.detect_prefix(markers) if prefix is None else prefix)
        except BaseException:
            self._file.close()  # a failed open must not leak the descriptor
            raise

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __repr__(self) -> str:
        return (
            f"SafetensorsCheckpoint({str(self.path)!r}, tensors={len(self._entries)}, "
            f"prefix={self.prefix!r}, bytes={self.file_size})"
        )

    # ----------------------------------------------------------------- header

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {str(self.path)!r} is truncated or corrupt: {why}; "
            f"re-download or re-copy the file (compare its size with the source)"
        )

    def _parse_header(self) -> tuple[bytes, dict[str, TensorInfo], dict[str, str]]:
        if self.file_size < 8:
            raise self._corrupt(f"the file has only {self.file_size} bytes, fewer than the 8-byte header length")
        raw_len = self._read_exact(0, 8)
        n = int.from_bytes(raw_len, "little")
        if n < 2 or n > MAX_HEADER_BYTES:
            raise self._corrupt(f"the header length field says {n} bytes, which no safetensors file has")
        if 8 + n > self.file_size:
            raise self._corrupt(f"the header needs {n} bytes but the file has only {self.file_size - 8} after the length")
        header_bytes = self._read_exact(8, n)
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"the header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._corrupt(f"the header is a JSON {type(header).__name__}, not an object")

        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._corrupt("__metadata__ is not a JSON object")
        metadata = {str(k): str(v) for k, v in metadata.items()}

        data_start = 8 + n
        data_size = self.file_size - data_start
        entries: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            entries[name] = self._parse_entry(name, entry, data_start, data_size)
        return header_bytes, entries, metadata

    def _parse_entry(self, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._corrupt(f"header entry {name!r} is not an object")
        dtype_str, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_str, str):
            raise self._corrupt(f"tensor {name!r} has no dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise self._corrupt(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise self._corrupt(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise self._corrupt(
                f"tensor {name!r} needs bytes [{begin}, {end}) of the data section but the file holds only "
                f"{data_size} data bytes (file size {self.file_size})"
            )
        dt = _DTYPES.get(dtype_str)
        if dt is not None:
            numel = 1
            for d in shape:
                numel *= d
            expected = numel * dt.itemsize
            if expected != end - begin:
                raise self._corrupt(
                    f"tensor {name!r} ({dtype_str}, shape {shape}) should take {expected} bytes "
                    f"but its data_offsets span {end - begin}"
                )
        return TensorInfo(name, dtype_str, tuple(shape), data_start + begin, data_start + end)

    # ----------------------------------------------------------------- names

    def keys(self) -> list[str]:
        """Every tensor name exactly as stored in the file (prefix included)."""
        return list(self._entries)

    def logical_keys(self) -> list[str]:
        """Names of the tensors under `self.prefix`, prefix removed, sorted."""
        p = self.prefix
        return sorted(k[len(p):] for k in self._entries if k.startswith(p))

    def detect_prefix(
        self,
        markers: Sequence[str] | str = (),
        candidates: Sequence[str] = DEFAULT_PREFIXES,
    ) -> str:
        """Return the first candidate prefix under which all `markers` live.

        A marker is a key name (`double_blocks.0.img_attn.qkv.weight`) or, ending in
        `.`, a key-name start (`double_blocks.`). Without markers, the first
        candidate that starts any key wins (`""` always does). A file with none of
        the markers is not the model the caller expects: that is a CheckpointError.
        """
        if isinstance(markers, str):
            markers = (markers,)
        keys = self._entries.keys()

        def present(full: str) -> bool:
            if full.endswith("."):
                return any(k.startswith(full) for k in keys)
            return full in self._entries

        for cand in candidates:
            if markers:
                if all(present(cand + m) for m in markers):
                    return cand
            elif cand == "" or any(k.startswith(cand) for k in keys):
                return cand
        if not markers:
            raise CheckpointError(f"no key of {str(self.path)!r} starts with any of the prefixes {list(candidates)}")
        raise CheckpointError(
            f"{str(self.path)!r} does not hold the expected tensors: none of the prefixes {list(candidates)} "
            f"has all of {list(markers)}; is this the right model file? "
            f"(some keys it holds: {sorted(keys)[:5]})"
        )

    def set_prefix(self, prefix: str) -> None:
        """Use `prefix` for logical names; it must start at least one key."""
        if prefix and not any(k.startswith(prefix) for k in self._entries):
            raise CheckpointError(f"no key of {str(self.path)!r} starts with the prefix {prefix!r}")
        self.prefix = prefix

    def _info(self, key: str) -> TensorInfo:
        info = self._entries.get(self.prefix + key)
        if info is not None:
            return info
        logical = self.logical_keys()
        hint = ""
        if self.prefix and key.startswith(self.prefix) and key in self._entries:
            hint = f"; pass names without the prefix {self.prefix!r}, e.g. {key[len(self.prefix):]!r}"
        else:
            close = difflib.get_close_matches(key, logical, n=3, cutoff=0.6)
            if close:
                hint = f"; close names: {', '.join(repr(c) for c in close)}"
        where = f" under the prefix {self.prefix!r}" if self.prefix else ""
        raise CheckpointError(f"tensor {key!r} is not in {str(self.path)!r}{where} ({len(logical)} tensors){hint}")

    # ----------------------------------------------------------------- per tensor

    def info(self, key: str) -> TensorInfo:
        return self._info(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        info = self._info(key)
        dt = _DTYPES.get(info.dtype_str)
        if dt is None:
            raise CheckpointError(
                f"tensor {key!r} has dtype {info.dtype_str}, which this loader does not support "
                f"(supported: {', '.join(sorted(_DTYPES))})"
            )
        return dt

    def nbytes(self, key: str) -> int:
        return self._info(key).nbytes

    # ----------------------------------------------------------------- reads

    def _read_exact(self, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        self._readinto_at(offset, memoryview(buf))
        return bytes(buf)

    def _readinto_at(self, offset: int, view: memoryview) -> None:
        """Fill `view` with file bytes from `offset`: seek + readinto, looping on short reads.

        Positioned reads (not mmap) keep RSS at the size of what we read. One lock
        per file makes seek+read atomic, so threads may share a checkpoint.
        """
        if self._file.closed:
            raise CheckpointError(f"checkpoint {str(self.path)!r} is closed; open it again to read")
        total = view.nbytes
        done = 0
        try:
            with self._lock:
                self._file.seek(offset)
                while done < total:
                    n = self._file.readinto(view[done:])
                    if not n:
                        raise self._corrupt(
                            f"the file ended at byte {offset + done} while reading {total} bytes from {offset}"
                        )
                    done += n
        except OSError as exc:
            raise CheckpointError(f"reading {str(self.path)!r} failed at byte {offset + done}: {exc}") from exc

    def load(
        self,
        keys: Iterable[str] | str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read only `keys` (logical names) and return {name: tensor}, in request order.

        Reads go in file-offset order (sequential on disk), each straight into a
        freshly allocated tensor; then the tensor is cast to `dtype` (if given) and
        moved to `device`, one at a time, so peak memory is the result plus one
        tensor. All names are checked before anything is read.
        """
        if isinstance(keys, str):
            keys = [keys]
        names = list(dict.fromkeys(keys))
        infos = {name: self._info(name) for name in names}
        for name in names:
            self.dtype(name)  # reject unsupported dtypes before reading anything
        if sys.byteorder != "little":
            raise CheckpointError("safetensors data is little-endian; this loader does not byte-swap on big-endian hosts")

        order = sorted(names, key=lambda n: infos[n].begin)
        total = sum(infos[n].nbytes for n in names)
        done = 0
        t0 = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        for name in order:
            tensor = self._read_tensor(name, infos[name])
            if dtype is not None and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            if torch.device(device) != tensor.device:
                tensor = tensor.to(device)
            out[name] = tensor
            done += infos[name].nbytes
            if progress is not None:
                progress(done, total, name)
        dt = time.perf_counter() - t0
        logger.debug(
            "loaded %d tensors, %.1f MB from %s in %.2f s (%.0f MB/s)",
            len(names), total / 1e6, self.path.name, dt, total / 1e6 / dt if dt > 0 else float("inf"),
        )
        return {name: out[name] for name in names}

    def _read_tensor(self, name: str, info: TensorInfo) -> torch.Tensor:
        # Allocate as bytes (bf16/fp8 have no numpy dtype), fill in place, then
        # reinterpret: no intermediate copy ever exists.
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._readinto_at(info.begin, memoryview(buf.numpy()).cast("B"))
        return buf.view(self.dtype(name)).reshape(info.shape)

    # ----------------------------------------------------------------- identity

    #: Bytes hashed from the start and from the end of each sampled tensor.
    FINGERPRINT_WINDOW = 64 * 1024
    #: How many tensors (spread over the sorted logical names) are sampled.
    FINGERPRINT_TENSORS = 32

    def fingerprint(self) -> str:
        """A stable, cheap content fingerprint of the model under `self.prefix`.

        sha256 (hex) over
          1. a version tag;
          2. the canonical tensor table: every logical name with its dtype and shape,
             sorted by name (JSON, fixed separators);
          3. for up to 32 tensors spread evenly over the sorted names (always the
             first and the last), the name and the first and last 64 KiB of its
             bytes (the whole tensor when smaller).

        Why this shape: it reads at most ~4 MiB, whatever the file size (never hash
        30 GB). The table pins the architecture; the sampled bytes tell apart two
        trainings or fine-tunes of one architecture, which change every weight. It
        is computed from logical names and tensor bytes, not from the raw header,
        so the same model with or without `model.diffusion_model.`, with other
        `__metadata__`, another key order or other tensors outside the prefix (VAE,
        text encoders) fingerprints the same, which is what two nodes checking
        "same model?" need. Limit: two files that differ only inside unsampled
        tensors or unsampled middle bytes (a merge touching a few tensors) collide;
        it identifies a model file for practical purposes, it is not a checksum.
        """
        logical = self.logical_keys()
        h = hashlib.sha256(b"comfy-mesh/safetensors-fingerprint/v1\n")
        table = [[k, self._info(k).dtype_str, list(self._info(k).shape)] for k in logical]
        h.update(json.dumps(table, separators=(",", ":")).encode())
        if logical:
            count = min(self.FINGERPRINT_TENSORS, len(logical))
            picks = sorted({round(i * (len(logical) - 1) / max(count - 1, 1)) for i in range(count)})
            w = self.FINGERPRINT_WINDOW
            for idx in picks:
                info = self._info(logical[idx])
                h.update(b"\n" + logical[idx].encode() + b"\n")
                if info.nbytes <= 2 * w:
                    h.update(self._read_exact(info.begin, info.nbytes))
                else:
                    h.update(self._read_exact(info.begin, w))
                    h.update(self._read_exact(info.end - w, w))
        return h.hexdigest()


# --------------------------------------------------------------------------- progress


class _TqdmProgress:
    """A `ProgressCallback` drawing a byte progress bar; the bar opens on first call."""

    def __init__(self, desc: str, *, force: bool = False) -> None:
        self.desc = desc
        self.disable = not (force or sys.stderr.isatty())
        self._bar = None

    def __call__(self, done: int, total: int, key: str) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=self.disable, leave=False,
            )
        self._bar.set_postfix_str(key, refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def tqdm_progress(desc: str, *, force: bool = False) -> _TqdmProgress:
    """A progress callback for `load` backed by tqdm on stderr.

    Silent when stderr is not a terminal (logs, pipes) unless `force`.
    """
    return _TqdmProgress(desc, force=force)


# --------------------------------------------------------------------------- writing


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> pathlib.Path:
    """Write `tensors` to `path` atomically: a reader sees the old file or the new one.

    Goes through a temporary file in the same directory, fsync, then `os.replace`,
    so a crash or a full disk never leaves a half-written checkpoint under the real
    name (which the loader would reject as truncated).
    """
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp,
            metadata=dict(metadata) if metadata is not None else None,
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
