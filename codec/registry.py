"""Codec names to codec classes, and decoding of any message by the name in its header.

Every message says which codec wrote it (`header["codec"]`), so a receiver needs no
configuration to decode: `decode(message)` looks the name up here. Encoders are made
with `get(name, **settings)`, which checks the settings against the codec's settings
dataclass and refuses unknown ones by name, so a typo in a config never passes silently.

Some codecs need hardware or optional packages (`nvenc`: an NVENC-capable GPU and
PyNvVideoCodec; `x265`: PyAV). A codec class may define `capability() -> (usable,
reason)`; `capabilities()` reports it for every registered codec, `available()` lists the
usable ones, and `get` of an unusable codec raises CodecError with the reason. Decoding
does not need the encoder: `decode` accepts every registered codec's messages (an nvenc
message decodes in software where there is no NVDEC), and `decode_capabilities()` says
which this machine can decode (`decode_capability()` on the class, where defined).
`formats()` gives each codec's message format version, which peers compare in HELLO.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import torch

from .base import Codec, CodecError, EncodedTensor, StreamState
from .checks import message_parts
from .cpu import CpuCodec
from .gpu import GpuCodec
from .nvenc import NvencCodec
from .raw import RawCodec
from .x265 import X265Codec

log = logging.getLogger(__name__)

_CODECS: dict[str, type] = {cls.name: cls for cls in (RawCodec, CpuCodec, GpuCodec, X265Codec, NvencCodec)}

# Decoding needs no settings: one default instance per codec serves every message.
_DECODERS: dict[str, Codec] = {}


def _capability(cls: type, probe_name: str = "capability") -> tuple[bool, str]:
    probe = getattr(cls, probe_name, None)
    return (True, "always available") if probe is None else probe()


def capabilities(names: Iterable[str] | None = None) -> dict[str, tuple[bool, str]]:
    """Every registered codec, or those `names` (an unknown one raises CodecError):
    (usable for encoding on this machine, why or why not).

    Probes run once per process (nvenc opens an NVENC session to find out: about 0.5 s
    the first time on a GPU machine; naming the codecs wanted skips the others' probes).
    """
    wanted = sorted(_CODECS if names is None else set(names))
    return {name: _capability(_codec_class(name)) for name in wanted}


def decode_capabilities() -> dict[str, tuple[bool, str]]:
    """Every registered codec: (can this machine decode its messages, why or why not),
    from the class's `decode_capability()` where it has one (an nvenc message decodes
    with NVDEC or, failing that, in software)."""
    return {name: _capability(_CODECS[name], "decode_capability") for name in sorted(_CODECS)}


def formats() -> dict[str, int]:
    """Every registered codec's message format version (header["v"]): two installs whose
    numbers differ for a codec cannot read each other's messages of it."""
    return {name: _CODECS[name].format_version for name in sorted(_CODECS)}


def available() -> list[str]:
    """Names that `get` accepts on this machine (usable codecs), sorted. `decode` also
    accepts messages of registered codecs that cannot encode here (see capabilities())."""
    return [name for name, (usable, _) in capabilities().items() if usable]


def _codec_class(name: Any) -> type:
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; available codecs: {', '.join(available())}") from None


def get(name: str, **settings: Any) -> Codec:
    """A new codec `name` configured by `settings` (the fields of its Settings dataclass)."""
    cls = _codec_class(name)
    usable, reason = _capability(cls)
    if not usable:
        raise CodecError(f"codec {name!r} cannot encode on this machine: {reason}")
    known = [f.name for f in dataclasses.fields(cls.Settings)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise CodecError(
            f"codec {name!r} has no setting {', '.join(map(repr, unknown))}; "
            f"its settings are: {', '.join(known) if known else 'none'}"
        )
    return cls(cls.Settings(**settings))


def decode(message: EncodedTensor, device: torch.device | str | None = None,
           state: StreamState | None = None) -> torch.Tensor:
    """Decode any codec's message, dispatching on `header["codec"]`.

    `state`: the receiver's StreamState for this stream, for codecs that code deltas.
    """
    header, _ = message_parts(message)
    if "codec" not in header:
        raise CodecError("message header names no codec: it is damaged or not a codec message")
    name = header["codec"]
    decoder = _DECODERS.get(name) if isinstance(name, str) else None
    if decoder is None:
        decoder = _DECODERS.setdefault(name, _codec_class(name)())
    return decoder.decode(message, device, state=state)


def warm_up(codec: Codec, channel_counts: Iterable, device, dtype: torch.dtype = torch.bfloat16) -> None:
    """Do `codec`'s first-use work now, for each channel count (ints; others are skipped):
    the gpu codec compiles its kernels per channel count, about a minute on a fresh
    machine, which the first sampler step would otherwise wait. Codecs without such work,
    and devices where it does not apply, return at once. Run it on the thread that will
    use the codec (kernels load into the CUDA context current there). A failure is
    logged, not raised: the codec's first real use then tries again and reports it."""
    warm = getattr(codec, "warm_up", None)
    if warm is None or torch.device(device).type != "cuda":
        return
    for channels in sorted({c for c in channel_counts if isinstance(c, int)}):
        log.info("preparing the %s codec for %d channels on %s (the first run on a machine compiles its kernels: "
                 "up to about a minute)", codec.name, channels, device)
        try:
            seconds = warm(channels, device, dtype)
        except Exception as e:  # noqa: BLE001 - the codec's first use tries again and reports what fails
            log.warning("%s codec warm-up failed (%s: %s); its first use will try again", codec.name,
                        type(e).__name__, e)
            return
        if seconds is not None:
            log.info("%s codec ready for %d channels in %.1f s", codec.name, channels, seconds)
