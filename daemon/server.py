"""The daemon's sockets: a ROUTER that never blocks on model work.

One thread owns the ROUTER socket: it receives, validates, answers HELLO and STATUS at
once (so a panel sees a daemon that is busy loading blocks), and queues FORWARD and
RECONFIGURE for the worker thread, which runs the model. The worker hands each reply
back over an inproc socket, since ZeroMQ sockets belong to one thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import zmq

from ..discovery.address import WILDCARDS, resolve_ipv4
from ..discovery.record import DiscoveryError
from .host import ModelHost
from .protocol import HelloRequest, Message, ProtocolError, StatusRequest, error_message, from_frames

log = logging.getLogger(__name__)

POLL_MS = 100  # how often the loop checks for a stop request
HARD_FRAME_SLACK_BYTES = 256 << 20  # see MAXMSGSIZE below


@dataclass
class ServerSettings:
    bind_host: str = "127.0.0.1"  # "0.0.0.0" to serve the LAN
    port: int = 0  # 0 picks a free port (see DaemonServer.port)
    linger_ms: int = 2000  # how long queued replies may take to leave on shutdown


class DaemonServer:
    def __init__(self, host: ModelHost, settings: ServerSettings | None = None):
        self.host = host
        self.settings = settings or ServerSettings()
        self.port: int | None = None
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._jobs: queue.Queue = queue.Queue()
        self._inproc = f"inproc://comfy-mesh-replies-{uuid.uuid4().hex}"
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        self._warmed = threading.Event()
        self._error: BaseException | None = None

    @property
    def endpoint(self) -> str:
        """Where a client reaches this daemon: a wildcard bind at loopback, a host or
        interface name (as --host takes them) at its IPv4 address."""
        host = self.settings.bind_host
        if host in WILDCARDS:
            host = "127.0.0.1"
        else:
            try:
                host = resolve_ipv4(host)
            except DiscoveryError:  # not IPv4 (an IPv6 address, say): as it was given
                pass
        return f"tcp://{host}:{self.port}"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "DaemonServer":
        """Bind and start serving in background threads; returns once bound and the
        worker has warmed its codecs up."""
        self._threads = [threading.Thread(target=self._loop, name="comfy-mesh-router", daemon=True),
                         threading.Thread(target=self._work, name="comfy-mesh-worker", daemon=True)]
        for t in self._threads:
            t.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        self._warmed.wait()  # the worker's codec warm-up (logged; it never raises)
        log.info("daemon %s serving on %s", self.host.settings.name, self.endpoint)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._jobs.put(None)
        for t in self._threads:
            t.join(timeout)
        self._ctx.term()

    def serve_forever(self) -> None:
        """Block until interrupted (Ctrl-C) or `stop()` from another thread."""
        if not self._ready.is_set():
            self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            log.info("interrupted; shutting down")
        finally:
            self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- threads

    def _loop(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        replies = self._ctx.socket(zmq.PULL)
        try:
            router.setsockopt(zmq.LINGER, self.settings.linger_ms)
            # A hard guard behind the application check: libzmq silently drops a peer that
            # sends one frame this large, before we allocate for it. It sits well above the
            # configured limit so that ordinary oversize requests get a clear TOO_LARGE reply.
            limit = self.host.settings.max_message_bytes
            router.setsockopt(zmq.MAXMSGSIZE, max(2 * limit, limit + HARD_FRAME_SLACK_BYTES))
            replies.bind(self._inproc)
            if self.settings.port:
                router.bind(f"tcp://{self.settings.bind_host}:{self.settings.port}")
                self.port = self.settings.port
            else:
                self.port = router.bind_to_random_port(f"tcp://{self.settings.bind_host}")
        except zmq.ZMQError as exc:
            self._error = OSError(f"cannot listen on {self.settings.bind_host}:{self.settings.port}: {exc}; "
                                  "is another daemon running there? choose another --port")
            router.close(0)
            replies.close(0)
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(POLL_MS))
                if router in events:
                    self._receive(router)
                if replies in events:
                    frames = replies.recv_multipart(copy=False)
                    router.send_multipart(frames, copy=False)
        finally:
            router.close()
            replies.close()

    def _receive(self, router) -> None:
        frames = router.recv_multipart(copy=False)
        identity, payload = frames[0], frames[1:]
        size = sum(len(f.buffer) for f in payload)
        try:
            msg = from_frames(payload, max_bytes=self.host.settings.max_message_bytes)
        except ProtocolError as exc:
            log.warning("refused a message of %d bytes: %s", size, exc)
            self._reply(router, identity, error_message(exc.code, exc.message), size)
            return
        if isinstance(msg.body, (HelloRequest, StatusRequest)):
            self._reply(router, identity, self.host.handle(msg), size)
        else:
            self._jobs.put((identity, msg, size))

    def _reply(self, sock, identity, reply: Message, size_in: int) -> None:
        frames = reply.to_frames()
        self.host.counters.record(size_in, sum(memoryview(f).nbytes for f in frames), reply.type == "ERROR")
        sock.send_multipart([identity] + frames, copy=False)

    def _work(self) -> None:
        try:  # here, not in the main thread: the codec's kernels load into this thread's context
            self.host.warm_up_codecs()
        finally:
            self._warmed.set()
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, self.settings.linger_ms)
        push.connect(self._inproc)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                identity, msg, size = job
                t0 = time.perf_counter()
                reply = self.host.handle(msg)
                log.debug("%s #%d answered in %.3f s", msg.type, msg.id, time.perf_counter() - t0)
                self._reply(push, identity, reply, size)
        finally:
            push.close()
