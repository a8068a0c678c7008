"""The one interface every way of finding peers has: start, stop, peers, events.

`PeerSource` is what the mDNS browser, the static list and their union implement;
`PeerTable` is the thread-safe table behind each, which turns "this is what I see now"
into add, update and remove events for the callbacks registered with `on_event`.
Peers are keyed by node id (the name plans use).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from .record import PeerRecord

log = logging.getLogger(__name__)

ADD, UPDATE, REMOVE = "add", "update", "remove"


@dataclass(frozen=True)
class PeerEvent:
    kind: str  # ADD, UPDATE or REMOVE
    record: PeerRecord  # for REMOVE, the last record seen


Listener = Callable[[PeerEvent], None]


class PeerTable:
    """Node id -> record, with listeners told about every change (from the caller's thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._peers: dict[str, PeerRecord] = {}
        self._listeners: list[Listener] = []

    def on_event(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def peers(self) -> list[PeerRecord]:
        with self._lock:
            return sorted(self._peers.values(), key=lambda r: (r.name, r.node))

    def get(self, node: str) -> PeerRecord | None:
        with self._lock:
            return self._peers.get(node)

    def put(self, record: PeerRecord) -> None:
        with self._lock:
            old = self._peers.get(record.node)
            if old == record:
                return
            self._peers[record.node] = record
        self._emit(PeerEvent(ADD if old is None else UPDATE, record))

    def remove(self, node: str) -> None:
        with self._lock:
            old = self._peers.pop(node, None)
        if old is not None:
            self._emit(PeerEvent(REMOVE, old))

    def clear(self) -> None:
        with self._lock:
            nodes = list(self._peers)
        for node in nodes:
            self.remove(node)

    def _emit(self, event: PeerEvent) -> None:
        # Outside the table's lock: a listener may read other tables (CombinedPeers).
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop discovery
                log.exception("peer event listener failed on %s %s", event.kind, event.record.node)


class PeerSource:
    """start(), stop(), peers(), on_event(listener): what the panel and `comfy-mesh peers` use."""

    def __init__(self):
        self.table = PeerTable()

    def start(self) -> "PeerSource":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def peers(self) -> list[PeerRecord]:
        return self.table.peers()

    def on_event(self, listener: Listener) -> None:
        self.table.on_event(listener)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class CombinedPeers(PeerSource):
    """The union of several sources (mDNS and a static list), one row per node id.

    When two sources see the same node, the one listed first wins; a node leaves the
    union only when no source sees it any more.
    """

    def __init__(self, sources: list[PeerSource]):
        super().__init__()
        self.sources = list(sources)
        self._lock = threading.Lock()
        for source in self.sources:
            source.on_event(self._changed)

    def start(self) -> "CombinedPeers":
        for source in self.sources:
            source.start()
        return self

    def stop(self) -> None:
        for source in self.sources:
            source.stop()

    def _changed(self, event: PeerEvent) -> None:
        node = event.record.node
        with self._lock:
            for source in self.sources:
                record = source.table.get(node)
                if record is not None:
                    self.table.put(record)
                    return
            self.table.remove(node)
