"""The split over an emulated gigabit LAN: two network namespaces, a veth pair shaped
to 1 Gbit/s with `tc tbf`, a daemon in one, the demo in the other. Needs root.

    sudo python bench/lan.py [--codecs raw,cpu,gpu] [--size 64] [--text-tokens 512]

Also checks that mDNS discovery crosses the link (`comfy-mesh peers` in one namespace sees
the daemon announcing in the other). Prints one JSON object per codec and a table. The
namespaces and the link are removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RATE = "1gbit"
NET = "10.77.{}.{}"


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def make_link(tag: str) -> tuple[str, str, str, str]:
    a, b = f"cm-a-{tag}", f"cm-b-{tag}"
    va, vb = f"cmva{tag}", f"cmvb{tag}"
    ip_a, ip_b = NET.format(int(tag) % 250, 1), NET.format(int(tag) % 250, 2)
    sh("ip", "netns", "add", a)
    sh("ip", "netns", "add", b)
    sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
    sh("ip", "link", "set", va, "netns", a)
    sh("ip", "link", "set", vb, "netns", b)
    for ns, dev, ip in ((a, va, ip_a), (b, vb, ip_b)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Each end shapes what it sends: 1 Gbit/s both ways, as a switched GbE port.
        sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", RATE, "burst", "256kb",
           "latency", "50ms")
    return a, b, ip_a, ip_b


def cli(ns: str, *args: str, **kw) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "comfy_mesh.cli", *args]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", default="raw,cpu,gpu")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--n-blocks-remote", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("network namespaces need root")
    tag = str(os.getpid() % 10000)
    a, b, ip_a, ip_b = make_link(tag)
    daemon = None
    try:
        daemon = subprocess.Popen(cli(b, "daemon", "--model", "tiny", "--host", ip_b, "--port", "5599"),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready = json.loads(daemon.stdout.readline())
        time.sleep(2)  # mDNS probing and announcement
        peers = json.loads(subprocess.run(cli(a, "peers", "--json", "--timeout", "4", "--interface", ip_a),
                                          check=True, capture_output=True, text=True).stdout)
        report = {"link": f"veth, tbf {RATE} each way", "daemon": ready["endpoint"],
                  "mdns_sees_daemon": any(peer.get("endpoint") == ready["endpoint"] for peer in peers), "runs": []}
        for codec in args.codecs.split(","):
            out = subprocess.run(cli(a, "demo", "--peer", f"{ip_b}:5599", "--codec", codec, "--json", "--size",
                                     str(args.size), "--text-tokens", str(args.text_tokens), "--steps",
                                     str(args.steps), "--n-blocks-remote", str(args.n_blocks_remote)),
                                 check=True, capture_output=True, text=True).stdout
            run = json.loads(out)
            report["runs"].append(run)
            print(json.dumps(run))
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
        print(f"{'codec':6s} {'MB/step':>8s} {'ratio':>6s} {'hop err':>8s} {'final err':>9s} "
              f"{'local ms':>8s} {'split ms':>8s}", file=sys.stderr)
        for r in report["runs"]:
            print(f"{r['codec']:6s} {r['bytes_per_step'] / 1e6:8.2f} {r['ratio']:6.2f} {r['hop_rel_err']:8.4f} "
                  f"{r['final_rel_err']:9.4f} {r['local_step_s'] * 1e3:8.0f} {r['split_step_s'] * 1e3:8.0f}",
                  file=sys.stderr)
        return 0
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    raise SystemExit(main())
