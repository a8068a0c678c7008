"""The client side of the protocol: a DEALER with request ids and deadlines.

`DaemonClient` sends one request at a time and waits for its reply until a deadline;
replies to earlier requests that timed out are recognised by id and dropped, so a late
answer can never be taken for the current one. ERROR replies become `PeerRefused`
exceptions that carry the daemon's code, message and (for a stale epoch) its plan.
"""

from __future__ import annotations

import itertools
import logging
import time

import zmq

from .protocol import (
    ErrorReply, HelloReply, HelloRequest, Message, ProtocolError, ReconfigureReply, ReconfigureRequest, StatusReply,
    StatusRequest, from_frames,
)

log = logging.getLogger(__name__)


class PeerError(RuntimeError):
    """Talking to a daemon failed; the message says which daemon and what to do."""


class PeerTimeout(PeerError):
    pass


class PeerRefused(PeerError):
    def __init__(self, endpoint: str, error: ErrorReply):
        super().__init__(f"{endpoint} refused: {error.code}: {error.message}")
        self.code = error.code
        self.error = error
        self.plan = error.plan


class DaemonClient:
    def __init__(self, endpoint: str, timeout_s: float = 120.0, name: str = "comfy-mesh-client",
                 context: zmq.Context | None = None):
        """`timeout_s`: how long a request may wait for its reply (block loading included)."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.name = name
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise PeerError(f"cannot connect to {endpoint!r}: {exc}; give the daemon as HOST:PORT") from None
        self.bytes_sent = 0
        self.bytes_received = 0

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, body, tensors: dict | None = None, timeout_s: float | None = None) -> Message:
        msg = Message(body, id=next(self._ids), tensors=tensors or {})
        frames = msg.to_frames()
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
        self._sock.send_multipart(frames, copy=False)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                raise PeerTimeout(f"no answer from {self.endpoint} to {msg.type} within "
                                  f"{self.timeout_s if timeout_s is None else timeout_s:.0f} s; is the daemon running "
                                  "and reachable (firewall, address, port)?")
            parts = self._sock.recv_multipart(copy=False)
            self.bytes_received += sum(len(p.buffer) for p in parts)
            try:
                reply = from_frames(parts)
            except ProtocolError as exc:
                raise PeerError(f"{self.endpoint} sent an unreadable reply: {exc}") from None
            if reply.id != msg.id and reply.id != 0:
                log.debug("dropping a late reply to request #%d", reply.id)
                continue
            if isinstance(reply.body, ErrorReply):
                raise PeerRefused(self.endpoint, reply.body)
            return reply

    # ---------------------------------------------------------------- typed calls

    def hello(self, fingerprint: str | None = None, codecs: list | None = None,
              timeout_s: float | None = None) -> HelloReply:
        return self.request(HelloRequest(client=self.name, fingerprint=fingerprint, codecs=codecs or []),
                            timeout_s=timeout_s).body

    def status(self, timeout_s: float | None = None) -> StatusReply:
        return self.request(StatusRequest(), timeout_s=timeout_s).body

    def reconfigure(self, plan, timeout_s: float | None = None) -> ReconfigureReply:
        return self.request(ReconfigureRequest(plan=plan.to_dict()), timeout_s=timeout_s).body
