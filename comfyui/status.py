"""Connection states of the node's peer links, for the node's text and `/comfy-mesh/status`.

Each split node (by its ComfyUI node id) has one `LinkState`; the link updates it as it
connects, runs and fails, and every update is also shown on the node through ComfyUI's
progress-text channel when a ComfyUI server is running. Import-light: no torch, no zmq.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# States a link goes through.
CONNECTING, CONNECTED, RUNNING, ERROR, CLOSED = "connecting", "connected", "running", "error", "closed"


@dataclass
class LinkState:
    key: str  # the ComfyUI node id, or another caller's key
    peer: str  # the peer as the user picked it: its name and address
    endpoint: str  # tcp://host:port
    state: str = CONNECTING
    message: str = ""  # the last error or notice, a sentence
    node: str | None = None  # the daemon's node id (plans use it)
    peer_name: str | None = None  # the daemon's human-readable name (HELLO)
    device: str | None = None  # the daemon's device
    model: str | None = None  # the daemon's checkpoint
    n_blocks: int = 0  # blocks of the model
    n_blocks_remote: int = 0  # blocks the peer runs under the current plan
    epoch: int = 0  # current plan epoch
    codec: str = "raw"
    steps: int = 0  # model evaluations split through this link
    step_s: float = 0.0  # the last one's time, front + wire + remote (s)
    bytes_per_step: int = 0  # wire bytes of the last evaluation, both directions
    raw_bytes_per_step: int = 0  # the same tensors as bf16
    warnings: list = field(default_factory=list)
    updated: float = field(default_factory=time.time)  # unix time of the last change

    def summary(self) -> str:
        """One or two lines for the node's face."""
        who = self.peer_name or self.peer
        if self.state == ERROR:
            return f"comfy-mesh: error with {who}\n{self.message}"
        head = f"comfy-mesh: {self.state} to {who} ({self.endpoint.removeprefix('tcp://')})"
        if self.n_blocks:
            head += f"\n{self.n_blocks_remote}/{self.n_blocks} blocks remote, plan epoch {self.epoch}, codec {self.codec}"
        if self.steps:
            mb = self.bytes_per_step / 1e6
            head += f"\n{self.steps} steps, last {self.step_s * 1000:.0f} ms, {mb:.2f} MB/step"
        for w in self.warnings:
            head += f"\nwarning: {w}"
        return head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class StatusBoard:
    """Thread-safe key -> LinkState; the sampler thread writes, the web server reads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._links: dict[str, LinkState] = {}

    def open(self, key: str, peer: str, endpoint: str) -> LinkState:
        with self._lock:
            state = LinkState(key=key, peer=peer, endpoint=endpoint)
            self._links[key] = state
        return state

    def update(self, key: str, show: bool = True, **changes) -> LinkState | None:
        with self._lock:
            state = self._links.get(key)
            if state is None:
                return None
            for name, value in changes.items():
                setattr(state, name, value)
            state.updated = time.time()
            text = state.summary()
        if show:
            show_on_node(key, text)
        return state

    def get(self, key: str) -> LinkState | None:
        with self._lock:
            state = self._links.get(key)
            return dataclasses.replace(state) if state is not None else None

    def close(self, key: str) -> None:
        with self._lock:
            state = self._links.get(key)
            if state is not None:
                state.state = CLOSED
                state.updated = time.time()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [s.to_dict() for s in self._links.values()]


BOARD = StatusBoard()


def show_on_node(node_id: str, text: str) -> None:
    """Put `text` on the node in the browser, if a ComfyUI server runs in this process.

    Uses ComfyUI's own progress-text channel (what built-in nodes use for status text);
    looks the server up in sys.modules rather than importing it, so outside ComfyUI (tests,
    scripts) this is a no-op.
    """
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None or not hasattr(prompt_server, "send_progress_text"):
        return
    try:
        prompt_server.send_progress_text(text, node_id)
    except Exception:  # a closed websocket must never fail a generation
        log.debug("could not send progress text to node %s", node_id, exc_info=True)
