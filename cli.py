"""The `comfy-mesh` command: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comfy-mesh", description=__doc__)
    parser.add_argument("--version", action="version", version=f"comfy-mesh {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    from . import demo
    from .daemon import main as daemon_main

    p = sub.add_parser("demo", help="split a tiny FLUX.2 across a loopback daemon and compare with all-local")
    demo.add_arguments(p)
    p.set_defaults(run=demo.run)

    p = sub.add_parser("daemon", help="serve model blocks to clients over ZeroMQ")
    daemon_main.add_arguments(p)
    p.set_defaults(run=daemon_main.run)

    from .discovery import cli as peers_cli
    from .panel import app as panel_app

    p = sub.add_parser("peers", help="list the daemons found over mDNS (and static --peer entries)")
    peers_cli.add_arguments(p)
    p.set_defaults(run=peers_cli.run)

    p = sub.add_parser("panel", help="the control panel: peers, VRAM, codec ratio, and the live split slider")
    panel_app.add_arguments(p)
    p.set_defaults(run=panel_app.run)

    from .codec import bench as codec_bench

    p = sub.add_parser("bench", help="benchmarks: `bench codec` measures every codec on the activation corpus")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    p = bench_sub.add_parser("codec", help="ratio, error and GB/s of each codec and quality on the corpus")
    codec_bench.add_arguments(p)
    p.set_defaults(run=codec_bench.main)

    args = parser.parse_args(argv)
    # Services log what they do; commands that print a result keep quiet unless asked (-v).
    quiet = args.command in ("demo", "peers", "bench")
    level = logging.DEBUG if args.verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as exc:  # domain errors carry their advice in the message
        logging.getLogger("comfy_mesh").debug("failed", exc_info=True)
        print(f"comfy-mesh {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
