"""What the ComfyUI node raises: one exception type whose message says what to do.

ComfyUI shows an exception raised by a node (or during sampling) in its error dialog,
type and message, so every failure of a split becomes a `MeshError` with a sentence a
user can act on. `explain` turns the daemon client's exceptions (`PeerTimeout`,
`PeerRefused` with an `ErrorCode`) into such messages; it works on duck-typed
attributes so this module imports nothing heavy.
"""

from __future__ import annotations


class MeshError(RuntimeError):
    """A split cannot run; the message names the peer and says what to do."""


# Codes of daemon/protocol.py ErrorCode, repeated as literals so that this module (which
# the node imports at ComfyUI start-up) needs neither torch nor zmq.
FINGERPRINT = "fingerprint"
OOM = "out_of_memory"
VERSION = "version"
TOO_LARGE = "too_large"
NOT_HOSTING = "not_hosting"
BAD_REQUEST = "bad_request"
INTERNAL = "internal"
MALFORMED = "malformed"


def bad_address(exc: BaseException, peer: str) -> MeshError:
    """A `MeshError` for an address the socket refuses to connect to (`tcp://bad host:5599`)."""
    detail = str(exc) or type(exc).__name__
    return MeshError(f"comfy-mesh: cannot connect to peer {peer}: bad address ({detail}). Write HOST:PORT with a host "
                     "name or IP address and no spaces, e.g. 127.0.0.1:5599 or [::1]:5599, or pick a discovered peer.")


def explain(exc: BaseException, peer: str, n_blocks_remote: int | None = None) -> MeshError:
    """A `MeshError` for a failure talking to `peer` (a name and address, for the message)."""
    kind = type(exc).__name__
    code = getattr(exc, "code", None)
    detail = getattr(exc, "error", None)
    message = getattr(detail, "message", None) or str(exc)
    hosting = f" {n_blocks_remote} blocks" if n_blocks_remote else " its blocks"
    if kind == "PeerTimeout":
        return MeshError(
            f"comfy-mesh: peer {peer} is unreachable (no answer in time). Check that the daemon is running there "
            "(`comfy-mesh daemon --model <the same .safetensors> --host 0.0.0.0 --port 5599`), that the address and "
            "port are right and that no firewall blocks the port; or pick another peer in the node.")
    if code == FINGERPRINT:
        return MeshError(f"comfy-mesh: model mismatch with peer {peer}: {message}")
    if code == OOM:
        return MeshError(
            f"comfy-mesh: peer {peer} ran out of GPU memory hosting{hosting}. Lower n_blocks_remote on the node "
            f"(or free that GPU) and queue the prompt again. Daemon said: {message}")
    if code == VERSION:
        return MeshError(f"comfy-mesh: peer {peer} speaks another protocol version: {message}. Install the same "
                         "comfy-mesh version in ComfyUI's Python and on the daemon's machine.")
    if code == TOO_LARGE:
        return MeshError(f"comfy-mesh: peer {peer} refused a message as too large: {message}. Choose a compressing "
                         "codec on the node (or start the daemon with a larger --max-message-mb).")
    if code == NOT_HOSTING:
        return MeshError(f"comfy-mesh: peer {peer} hosts no blocks now: {message}. Queue the prompt again; the node "
                         "re-sends its plan when it connects.")
    if code in (BAD_REQUEST, MALFORMED):
        return MeshError(f"comfy-mesh: peer {peer} refused a request: {message}. Check that ComfyUI and the daemon "
                         "run the same comfy-mesh version and model.")
    if code == INTERNAL:
        return MeshError(f"comfy-mesh: peer {peer} failed internally: {message}. See the daemon's log; restarting "
                         "the daemon usually helps.")
    if kind == "PeerRefused":
        return MeshError(f"comfy-mesh: peer {peer} refused: {code}: {message}")
    if kind == "PeerError":
        return MeshError(f"comfy-mesh: talking to peer {peer} failed: {message}. Check that it is a comfy-mesh "
                         "daemon of the same version.")
    return MeshError(f"comfy-mesh: split with peer {peer} failed: {kind}: {message}")
