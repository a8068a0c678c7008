"""Finding peers: mDNS announce and browse, and the peer record."""
