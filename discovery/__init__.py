"""Finding peers: mDNS announce and browse, static `host:port` peers, and the peer record.

    from comfy_mesh.discovery import peer_source
    with peer_source(interfaces=["127.0.0.1"], static=["10.8.0.2:5599"]) as peers:
        ...  # peers.peers() -> [PeerRecord]; peers.on_event(fn) gets add/update/remove

Every source has the same small interface (`start`, `stop`, `peers`, `on_event`);
see `base.py`. zeroconf loads only when mDNS is used.
"""

from __future__ import annotations

from .base import ADD, REMOVE, UPDATE, CombinedPeers, PeerEvent, PeerSource, PeerTable
from .record import SERVICE_TYPE, DiscoveryError, PeerRecord


def peer_source(interfaces: list[str] | None = None, static: list[str] | None = None,
                mdns: bool = True, static_interval_s: float = 3.0) -> PeerSource:
    """mDNS on `interfaces` (None: all) unless `mdns` is False, plus the static `HOST:PORT` peers."""
    sources: list[PeerSource] = []
    if mdns:
        from .mdns import MdnsBrowser

        sources.append(MdnsBrowser(interfaces))
    if static:
        from .static import StaticPeers

        sources.append(StaticPeers(static, interval_s=static_interval_s))
    if not sources:
        raise DiscoveryError("discovery is off and no static peers are given: name peers with --peer HOST:PORT "
                             "or turn mDNS back on")
    return sources[0] if len(sources) == 1 else CombinedPeers(sources)


__all__ = ["ADD", "UPDATE", "REMOVE", "SERVICE_TYPE", "CombinedPeers", "DiscoveryError", "PeerEvent", "PeerRecord",
           "PeerSource", "PeerTable", "peer_source"]
