"""`comfy-mesh peers`: list the daemons that discovery finds (mDNS and static peers)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import peer_source
from .address import ipv4_address
from .record import PeerRecord


def add_discovery_arguments(p: argparse.ArgumentParser) -> None:
    """The options every discovery user shares (`peers`, `panel`)."""
    p.add_argument("--interface", action="append", type=ipv4_address, default=None, metavar="IP",
                   help="browse mDNS on the interface with this IPv4 address (repeatable; default: all interfaces)")
    p.add_argument("--peer", action="append", default=None, metavar="HOST:PORT",
                   help="a daemon to ask directly, where multicast does not reach (a VPN); repeatable")
    p.add_argument("--no-mdns", action="store_true", help="turn mDNS discovery off (static --peer entries only)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_discovery_arguments(p)
    p.add_argument("--timeout", type=float, default=3.0, metavar="S",
                   help="seconds to listen before printing (default 3)")
    p.add_argument("--json", action="store_true", help="print a JSON list of peer objects")


def run(args: argparse.Namespace) -> int:
    if args.timeout < 0:
        raise ValueError("--timeout must be >= 0 seconds")
    source = peer_source(interfaces=args.interface, static=args.peer, mdns=not args.no_mdns,
                         static_interval_s=max(args.timeout / 2, 0.5))
    source.start()
    try:
        time.sleep(args.timeout)  # mDNS answers come as they come: listen for the whole window
        peers = source.peers()
    finally:
        source.stop()
    if args.json:
        json.dump([p.to_json() for p in peers], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(peers))
    return 0


def gib(n: int) -> str:
    """Bytes as GiB with one decimal, without the unit."""
    return f"{n / 2**30:.1f}"


def memory_text(p: PeerRecord) -> str:
    """'3.2/24.0 GiB VRAM' or '0.4/31.2 GiB process' (a CPU node: its RSS and the machine's RAM);
    the peers table and the panel's Memory column both show this."""
    label = "VRAM" if p.memory_kind == "cuda" else "process"
    return f"{gib(p.vram_used)}/{gib(p.vram_total)} GiB {label}"


def blocks_text(p: PeerRecord) -> str:
    return f"[{p.blocks[0]}, {p.blocks[1]}) of {p.n_blocks}" if p.blocks else f"none of {p.n_blocks}"


def format_table(peers: list[PeerRecord]) -> str:
    if not peers:
        return ("no peers found; is a daemon running (comfy-mesh daemon ...)? Multicast may not reach it: "
                "name it with --peer HOST:PORT\n")
    rows = [("NAME", "ADDRESS", "GPU", "MEMORY", "CODECS", "MODEL", "BLOCKS", "STATE")]
    for p in peers:
        rows.append((p.name, f"{p.address}:{p.port}", ", ".join(p.gpus) or "CPU", memory_text(p),
                     ",".join(p.codecs), p.model or "-", blocks_text(p), p.state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows)
