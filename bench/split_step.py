"""Step time all-local vs split over loopback, for a real-sized FLUX.2 with random weights.

    python bench/split_step.py --config flux2-klein-9b --checkpoint /tmp/klein9b.safetensors \
        --size 64 --text-tokens 512 --steps 4 --codec raw

Writes the seeded random checkpoint first if the file does not exist (a real
.safetensors in BFL key names), then runs the demo's measurement on it: the same Euler
loop all-local, then split with a daemon process on loopback. Prints one JSON object
per codec and a short table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from comfy_mesh.demo import add_arguments as demo_arguments, format_table, run_demo
from comfy_mesh.splitter.flux2.config import KNOWN_SIZES
from comfy_mesh.splitter.flux2.random_weights import write_random_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="flux2-klein-9b", choices=sorted(KNOWN_SIZES))
    p.add_argument("--codecs", default="raw", help="comma-separated codecs to run (default raw)")
    demo_arguments(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.checkpoint is None:
        p.error("--checkpoint PATH is required (written there if missing)")
    if not os.path.exists(args.checkpoint):
        t0 = time.perf_counter()
        write_random_checkpoint(args.checkpoint, KNOWN_SIZES[args.config], seed=args.seed, dtype=torch.bfloat16)
        print(f"wrote {args.checkpoint} ({os.path.getsize(args.checkpoint) / 1e9:.1f} GB) in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    results = []
    for name in args.codecs.split(","):
        args.codec = name
        result = run_demo(args)
        result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        results.append(result)
        print(json.dumps(result))
        print(format_table(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
