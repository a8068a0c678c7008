"""`comfy-mesh daemon`: serve the tail of a model on this node's GPU (or CPU)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
import uuid

import torch

from ..discovery.address import ipv4_address
from ..splitter.model_file import dtype_from_name, open_model
from .host import HostSettings, ModelHost
from .server import DaemonServer, ServerSettings

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint: a .safetensors path, hf://ORG/REPO/file.safetensors (local cache honoured), or "
                        "tiny[:SEED] (the demo's seeded tiny model)")
    p.add_argument("--blocks", type=int, default=0, metavar="K",
                   help="host the last K blocks and the final layer from the start (default 0: wait for a plan)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 serves the LAN")
    p.add_argument("--port", type=int, default=5599, help="TCP port (0 picks a free one); default 5599")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default=None, help="weights and compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--name", default=None, help="human-readable node name (default: hostname)")
    p.add_argument("--node-id", default=None, help="the name plans use for this node (default: random, stable per run)")
    p.add_argument("--max-message-mb", type=float, default=1024.0, help="refuse requests larger than this (MB)")
    p.add_argument("--no-announce", action="store_true",
                   help="do not announce this daemon over mDNS (peers can still name it as HOST:PORT)")
    p.add_argument("--announce-interface", action="append", type=ipv4_address, default=None, metavar="IP",
                   help="announce on the interface with this IPv4 address (repeatable; default: where --host "
                        "listens: loopback for 127.0.0.1, every interface for 0.0.0.0)")
    p.add_argument("--announce-refresh", type=float, default=5.0, metavar="S",
                   help="republish memory figures at most every S seconds (plan changes go out at once); default 5")


def build(args: argparse.Namespace) -> DaemonServer:
    device = args.device or default_device()
    dtype = dtype_from_name(args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = open_model(args.model)
    settings = HostSettings(node_id=args.node_id or f"node-{uuid.uuid4().hex[:8]}",
                            name=args.name or socket.gethostname(), device=device, dtype=dtype,
                            max_message_bytes=int(args.max_message_mb * 1e6))
    host = ModelHost(model, settings, n_blocks_hosted=args.blocks)
    return DaemonServer(host, ServerSettings(bind_host=args.host, port=args.port))


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM shuts down like Ctrl-C: replies leave, the announcement is withdrawn


def run(args: argparse.Namespace) -> int:
    server = build(args)
    server.start()
    announcer = None
    if not getattr(args, "no_announce", False):
        try:
            from .announce import DaemonAnnouncer  # zeroconf loads only for daemons that announce

            announcer = DaemonAnnouncer(server, interfaces=getattr(args, "announce_interface", None),
                                        refresh_s=getattr(args, "announce_refresh", 5.0)).start()
        except BaseException:
            server.stop()
            raise
    try:
        hosted = server.host.hosted
        # One JSON line on stdout says the daemon is ready and where; logs go to stderr.
        sys.stdout.write(json.dumps({"event": "ready", "endpoint": server.endpoint,
                                     "node": server.host.settings.node_id,
                                     "hosted": hosted.to_list() if hosted else None,
                                     "announce": (announcer.interfaces or "all") if announcer else None}) + "\n")
        sys.stdout.flush()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)
        idle = threading.Event()
        while not idle.wait(0.5):  # until Ctrl-C or SIGTERM; short waits keep signals prompt
            pass
    except KeyboardInterrupt:
        log.info("interrupted; shutting down")
    finally:
        # Withdraw the announcement first: browsers drop the daemon before its sockets close.
        if announcer is not None:
            announcer.stop()
        server.stop()
    return 0
