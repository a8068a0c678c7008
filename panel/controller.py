"""Talks to the selected daemon without ever blocking the GUI: HELLO, STATUS polls, RECONFIGURE.

Every request runs on a short-lived daemon thread with its own `DaemonClient` (a
ZeroMQ socket belongs to one thread) and a deadline; its result comes back to the GUI
thread as a Qt signal. Results for a peer that is no longer selected are dropped.

Moving the split: `move(k)` asks the daemon for its current plan epoch and sends
RECONFIGURE with `tail_split(n_blocks, k, remote=node, epoch=epoch + 1)`. A generation
that uses the daemon gets STALE_EPOCH at its next step and adopts the plan there. While
one move is in flight, further moves are coalesced: only the latest value is sent next.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from PySide6.QtCore import QObject, QTimer, Signal

from ..daemon.client import DaemonClient, PeerError, PeerRefused
from ..daemon.protocol import ErrorCode
from ..discovery.record import PeerRecord
from ..splitter.errors import PlanError
from ..splitter.plan import tail_split

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 5.0
STATUS_TIMEOUT_S = 2.0
RECONFIGURE_TIMEOUT_S = 600.0  # loading many large blocks from a slow disk takes minutes


@dataclass
class MoveResult:
    n_blocks_remote: int
    reply: object  # ReconfigureReply
    seconds: float  # request to reply, as the panel saw it


class _Results(QObject):
    """Carries (generation, callback, value, error) from worker threads to the GUI thread."""

    done = Signal(int, object, object, object)


class PeerController(QObject):
    hello = Signal(object)  # HelloReply of the selected peer
    status = Signal(object, float)  # StatusReply, monotonic time it arrived
    moving = Signal(int)  # a RECONFIGURE to this n_blocks_remote was sent
    moved = Signal(object)  # MoveResult
    error = Signal(str)  # something failed; the message says what to do
    reachable = Signal(str, bool)  # node id, whether it answers

    def __init__(self, poll_s: float = 0.5, parent: QObject | None = None):
        super().__init__(parent)
        self.peer: PeerRecord | None = None
        self.info = None  # HelloReply
        self.last_status = None
        self._generation = 0
        self._status_in_flight = False
        self._move_in_flight = False
        self._pending_move: int | None = None
        self._reachable = True
        self._last_error: str | None = None  # the last poll error shown, not repeated every poll
        self._results = _Results()  # parentless: lives as long as a worker thread holds it
        self._results.done.connect(self._deliver)
        self._timer = QTimer(self)
        self._timer.setInterval(int(poll_s * 1000))
        self._timer.timeout.connect(self.poll)

    # ---------------------------------------------------------------- public (GUI thread)

    @property
    def busy(self) -> bool:
        return self._move_in_flight or self._pending_move is not None

    def select(self, peer: PeerRecord | None) -> None:
        """Follow `peer` (None: nothing): HELLO now, then STATUS every poll interval."""
        self._generation += 1
        self.peer, self.info, self.last_status = peer, None, None
        self._status_in_flight = self._move_in_flight = False
        self._pending_move = None
        self._reachable = True
        self._last_error = None
        self._timer.stop()
        if peer is None:
            return
        endpoint, gen = peer.endpoint, self._generation
        self._submit(gen, lambda: _with_client(endpoint, HELLO_TIMEOUT_S, lambda c: c.hello()), self._on_hello)
        self._timer.start()

    def update_peer(self, peer: PeerRecord) -> None:
        """Discovery has a newer record of the selected peer (its address may have changed)."""
        if self.peer is not None and peer.node == self.peer.node:
            if peer.endpoint != self.peer.endpoint:
                self.select(peer)
            else:
                self.peer = peer

    def move(self, n_blocks_remote: int) -> None:
        """Send the selected daemon a tail split with `n_blocks_remote` blocks (coalesced)."""
        if self.peer is None or self.info is None:
            self.error.emit("select a peer first, and wait until it answers")
            return
        if self._move_in_flight:
            self._pending_move = n_blocks_remote
            return
        self._move_in_flight = True
        self.moving.emit(n_blocks_remote)
        peer, n_blocks, gen = self.peer, self.info.n_blocks, self._generation
        self._submit(gen, lambda: _reconfigure(peer, n_blocks, n_blocks_remote), self._on_moved)

    def poll(self) -> None:
        if self.peer is None or self._status_in_flight:
            return
        self._status_in_flight = True
        endpoint = self.peer.endpoint
        self._submit(self._generation, lambda: _with_client(endpoint, STATUS_TIMEOUT_S, lambda c: c.status()),
                     self._on_status)

    def shutdown(self) -> None:
        self._timer.stop()
        self._generation += 1  # drop whatever is still in flight

    # ---------------------------------------------------------------- results (GUI thread)

    def _on_hello(self, reply, exc) -> None:
        if exc is not None:
            self._failed(exc, "could not reach")
            if self.peer is not None:  # try again at the next poll
                self.info = None
            return
        self.info = reply
        self._last_error = None
        self._set_reachable(True)
        self.hello.emit(reply)

    def _on_status(self, reply, exc) -> None:
        self._status_in_flight = False
        if exc is not None:
            self._failed(exc, "lost contact with")
            return
        self.last_status = reply
        self._last_error = None
        self._set_reachable(True)
        if self.info is None and self.peer is not None:  # the HELLO failed earlier: try it again
            endpoint, gen = self.peer.endpoint, self._generation
            self._submit(gen, lambda: _with_client(endpoint, HELLO_TIMEOUT_S, lambda c: c.hello()), self._on_hello)
        self.status.emit(reply, time.monotonic())

    def _on_moved(self, result, exc) -> None:
        self._move_in_flight = False
        if exc is not None:
            self._pending_move = None
            self._failed(exc, "could not move the split on", repeat=True)
        else:
            self.moved.emit(result)
        if self._pending_move is not None:
            k, self._pending_move = self._pending_move, None
            self.move(k)

    def _failed(self, exc: BaseException, what: str, repeat: bool = False) -> None:
        """Show an error; a poll's error (`repeat` False) only when it differs from the last one shown."""
        name = self.peer.name if self.peer else "the peer"
        expected = isinstance(exc, (PeerError, PlanError))
        message = f"{what} {name}: {exc}" if expected else f"{what} {name}: {type(exc).__name__}: {exc} (see the log)"
        if not repeat and message == self._last_error:
            return  # already said: don't repeat the same error every poll
        self._last_error = None if repeat else message
        if not expected:  # a bug: say so in the window, with the log for details
            log.error("panel request failed", exc_info=exc)
        if isinstance(exc, PeerError) and not isinstance(exc, PeerRefused):
            if not self._set_reachable(False):
                return  # already said that it does not answer
        self.error.emit(message)

    def _set_reachable(self, ok: bool) -> bool:
        """Record reachability; True when it changed."""
        if self._reachable == ok:
            return False
        self._reachable = ok
        if self.peer is not None:
            self.reachable.emit(self.peer.node, ok)
        return True

    # ---------------------------------------------------------------- threads

    def _submit(self, generation: int, job: Callable[[], object], callback: Callable) -> None:
        results = self._results

        def work():
            try:
                value, err = job(), None
            except Exception as exc:  # delivered to the GUI thread, which shows it
                value, err = None, exc
            try:
                results.done.emit(generation, callback, value, err)
            except RuntimeError:  # the panel closed meanwhile
                pass

        # Daemon threads: a long RECONFIGURE must not keep a closed panel's process alive.
        threading.Thread(target=work, name="comfy-mesh-panel-request", daemon=True).start()

    def _deliver(self, generation: int, callback, value, err) -> None:
        if generation != self._generation:  # for a peer no longer selected (select() reset its move state)
            return
        callback(value, err)


def _with_client(endpoint: str, timeout_s: float, call):
    with DaemonClient(endpoint, timeout_s=timeout_s, name="comfy-mesh-panel") as client:
        return call(client)


def _reconfigure(peer: PeerRecord, n_blocks: int, k: int) -> MoveResult:
    """Worker thread: read the daemon's epoch, send the new plan; adopt a newer epoch and retry."""
    t0 = time.perf_counter()
    with DaemonClient(peer.endpoint, timeout_s=RECONFIGURE_TIMEOUT_S, name="comfy-mesh-panel") as client:
        epoch = client.status(timeout_s=STATUS_TIMEOUT_S).epoch
        for _ in range(3):  # someone else (a generation, another panel) may move it at the same moment
            plan = tail_split(n_blocks, k, remote=peer.node, epoch=epoch + 1)
            try:
                reply = client.reconfigure(plan)
                return MoveResult(k, reply, time.perf_counter() - t0)
            except PeerRefused as exc:
                if exc.code != ErrorCode.STALE_EPOCH or not exc.plan:
                    raise
                epoch = max(epoch + 1, int(exc.plan.get("epoch", epoch)))
    raise PeerError(f"{peer.name}'s plan kept changing while the panel moved it; try again")
