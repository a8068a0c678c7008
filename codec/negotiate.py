"""`--codec auto`: pick the codec for each direction from both ends' capabilities.

Order of preference, and why:

1. `raw` on loopback (and on links the user marks fast): nothing beats not coding when
   the wire is faster than any encoder.
2. `nvenc` where this end encodes it (a card with NVENC) and the peer decodes it (NVDEC,
   or FFmpeg): the video engine works beside the CUDA cores, nearly free.
3. `gpu` where this end has a CUDA device (no NVENC, as on an H100): the codec runs in a
   few kernels on the tensor where it already is.
4. `cpu` otherwise.

The reply (model output) goes the other way, so the same rule runs with the roles swapped.
A codec whose message format version differs between the two installs (HELLO's
`formats`) is left out both ways, with the reason in the choice: its messages would only
fail to decode.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

PREFERENCE = ("nvenc", "gpu", "cpu")


@dataclass(frozen=True)
class Choice:
    carry: str  # codec for what this end sends
    reply: str  # codec for what the peer sends back
    reason: str
    # why for the carry alone (and the codecs left out), for an end that takes the reply raw
    carry_reason: str

    def to_dict(self) -> dict:
        return {"codec": self.carry, "reply_codec": self.reply, "reason": self.reason}


def is_loopback(endpoint: str) -> bool:
    host = urllib.parse.urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pick(sender_encodes: list[str], sender_cuda: bool, receiver_decodes: list[str],
          unusable: dict[str, str]) -> tuple[str, str]:
    for name in PREFERENCE:
        if (name == "gpu" and not sender_cuda) or name in unusable:
            continue
        if name in sender_encodes and name in receiver_decodes:
            why = {"nvenc": "the sender has an NVENC encoder and the receiver decodes HEVC",
                   "gpu": "the sender has a CUDA device but no NVENC",
                   "cpu": "no GPU codec is usable on the sender"}[name]
            return name, why
    return "raw", "no compressing codec is shared by both ends"


def choose(endpoint: str, *, local_encoders: list[str], local_decoders: list[str], local_cuda: bool,
           peer_encoders: list[str], peer_decoders: list[str], peer_cuda: bool, fast_link: bool = False,
           unusable: dict[str, str] | None = None) -> Choice:
    """`unusable`: codecs not to pick, name -> why (format_mismatches())."""
    if is_loopback(endpoint) or fast_link:
        where = "loopback" if is_loopback(endpoint) else "a link marked fast"
        why = f"{where}: sending raw tensors is faster than coding them"
        return Choice("raw", "raw", why, why)
    unusable = {n: why for n, why in (unusable or {}).items() if n != "raw"}  # raw is the fallback
    carry, why_carry = _pick(local_encoders, local_cuda, peer_decoders, unusable)
    reply, why_reply = _pick(peer_encoders, peer_cuda, local_decoders, unusable)
    skipped = [f"{n} not used ({why})" for n, why in sorted(unusable.items())
               if n in PREFERENCE and (n in local_encoders or n in peer_encoders)]
    carry_part = f"carry {carry}: {why_carry}"
    return Choice(carry, reply, "; ".join([carry_part, f"reply {reply}: {why_reply}"] + skipped),
                  "; ".join([carry_part] + skipped))


def format_mismatches(peer_formats: dict | None) -> dict[str, str]:
    """Codecs whose message format differs between this install and a peer's (from its
    HELLO: codec name -> version), name -> why. An older peer that does not say: none."""
    from . import registry

    if not isinstance(peer_formats, dict):
        return {}
    return {name: f"this end's {name} messages are format {ours}, the peer's {peer_formats[name]}: install the "
                  f"same comfy-mesh version on both"
            for name, ours in registry.formats().items() if name in peer_formats and peer_formats[name] != ours}


def choose_for_peer(endpoint: str, info, *, local_cuda: bool, fast_link: bool = False) -> Choice:
    """`choose` against a peer's HELLO reply (`info`: encoders, decoders, device, formats;
    an older peer sends one `codecs` list for both)."""
    encoders, decoders = local_capabilities()
    return choose(endpoint, local_encoders=encoders, local_decoders=decoders, local_cuda=local_cuda,
                  peer_encoders=info.encoders if info.encoders is not None else info.codecs,
                  peer_decoders=info.decoders if info.decoders is not None else info.codecs,
                  peer_cuda=str(info.device or "").startswith("cuda"), fast_link=fast_link,
                  unusable=format_mismatches(getattr(info, "formats", None)))


def local_capabilities() -> tuple[list[str], list[str]]:
    """(codecs this process can encode, codecs it can decode), from the registry's probes."""
    from . import registry

    encoders = [name for name, (usable, _) in registry.capabilities().items() if usable]
    decoders = [name for name, (usable, _) in registry.decode_capabilities().items() if usable]
    return encoders, decoders
