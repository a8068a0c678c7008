"""`comfy-mesh demo`: prove a split generation equals the unsplit one, and show the cost.

It writes a tiny seeded FLUX.2 checkpoint (a real .safetensors in BFL/ComfyUI key
names), starts a daemon process on loopback hosting the last `n` blocks, runs the
same flow-matching Euler loop all-local and split, and reports what crossed the wire.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from . import codec as codecs
from .daemon.client import DaemonClient
from .daemon.remote_stage import RemoteStage
from .splitter.flux2.stage import image_ids, text_ids
from .splitter.model_file import dtype_from_name, open_model
from .splitter.plan import BlockRange, tail_split
from .splitter.sampling import euler_sample, flow_sigmas
from .splitter.split_runner import SplitRunner

log = logging.getLogger(__name__)

# loading its blocks, and on a fresh machine compiling the gpu codec's kernels (about a minute)
DAEMON_START_TIMEOUT_S = 300


@dataclass
class DemoInputs:
    noise: torch.Tensor  # (B, n_img, C) latent tokens
    txt: torch.Tensor  # (B, n_txt, context_dim)
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: torch.Tensor | None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-blocks-remote", type=int, default=None, metavar="K",
                   help="blocks the daemon runs (default: half the model, rounded up)")
    p.add_argument("--codec", default="raw",
                   help=f"activation codec: auto, {', '.join(codecs.available())} (default raw; auto picks raw on "
                        "loopback, see README)")
    p.add_argument("--quality", type=float, default=None,
                   help="cpu/x265 codec quality (levels per robust std / QP mapping; codec default if omitted)")
    p.add_argument("--rel-err", type=float, default=None,
                   help="gpu codec target relative L2 error per crossing (codec default 0.03 if omitted)")
    p.add_argument("--steps", type=int, default=8, help="sampler steps (default 8)")
    p.add_argument("--checkpoint", default=None,
                   help="a FLUX.2 .safetensors, hf://ORG/REPO/file.safetensors or tiny[:SEED] (default: tiny:SEED, "
                        "the seeded tiny model, written once into ~/.cache/comfy-mesh)")
    p.add_argument("--peer", default=None, metavar="HOST:PORT",
                   help="use this running daemon instead of starting one on loopback; it must serve the same model "
                        "(start it with: comfy-mesh daemon --model tiny --host 0.0.0.0)")
    p.add_argument("--size", type=int, default=32, help="latent grid side in tokens (default 32: 32x32 tokens)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def make_codec(name: str, quality: float | None = None, rel_err: float | None = None):
    """The codec `name` with whichever of the quality knobs it has (others are an error)."""
    settings = {k: v for k, v in (("quality", quality), ("rel_err", rel_err)) if v is not None}
    if name == "auto":
        if settings:
            raise ValueError("--quality/--rel-err need a named codec, not auto")
        return "auto"
    return codecs.get(name, **settings)


def make_inputs(config, size: int, n_txt: int, seed: int, device: str = "cpu") -> DemoInputs:
    """Seeded noise and a stand-in text embedding (the demo has no text encoder)."""
    gen = torch.Generator().manual_seed(seed)
    return DemoInputs(
        noise=torch.randn(1, size * size, config.in_channels, generator=gen).to(device),
        txt=torch.randn(1, n_txt, config.context_dim, generator=gen).to(device),
        img_ids=image_ids(1, size, size), txt_ids=text_ids(1, n_txt),
        guidance=torch.tensor([4.0]) if config.guidance_embed else None)


def sample(model_fn, inputs: DemoInputs, steps: int) -> tuple[torch.Tensor, list[float]]:
    """Run the Euler loop; returns the final latent and each step's seconds."""
    times = []

    def velocity(x, sigma, i):
        t0 = time.perf_counter()
        v = model_fn(x, inputs.txt, sigma, inputs.img_ids, inputs.txt_ids, inputs.guidance)
        if v.is_cuda:
            torch.cuda.synchronize(v.device)  # time the work, not its launch
        # The split runner measures each hop's error on the side; that is not the step's cost.
        stats = getattr(model_fn, "stats", None)
        diagnostic = sum(h.measure_s for h in stats[-1].hops) if stats else 0.0
        times.append(time.perf_counter() - t0 - diagnostic)
        return v

    return euler_sample(velocity, inputs.noise, flow_sigmas(steps, shift=3.0)), times


def peer_endpoint(peer: str) -> str:
    host, sep, port = peer.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdecimal()):
        raise ValueError(f"--peer wants HOST:PORT, got {peer!r}")
    return f"tcp://{host}:{port}"


def start_daemon(checkpoint: str, n_blocks: int, device: str, dtype: str,
                 log_file) -> tuple[subprocess.Popen, str]:
    """A real daemon process on loopback; returns it and its endpoint once it is ready.

    Its log goes to `log_file` (shown if it fails to start), so the demo's own output
    stays a table.
    """
    cmd = [sys.executable, "-m", "comfy_mesh.cli", "daemon", "--model", checkpoint, "--blocks", str(n_blocks),
           "--port", "0", "--device", device, "--dtype", dtype, "--name", "demo-daemon",
           "--no-announce"]  # a loopback demo has nothing to announce to the network
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    line = ""
    if select.select([proc.stdout], [], [], DAEMON_START_TIMEOUT_S)[0]:
        line = proc.stdout.readline()  # the daemon's first stdout line is its ready record
    if not line:
        proc.kill()
        proc.wait(10)
        log_file.seek(0)
        tail = log_file.read()[-2000:]
        raise RuntimeError(f"the demo daemon did not start within {DAEMON_START_TIMEOUT_S} s "
                           f"(exit code {proc.poll()}); its log:\n{tail}")
    return proc, json.loads(line)["endpoint"]


def run_demo(args: argparse.Namespace) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = dtype_from_name(dtype_name)
    codec = make_codec(args.codec, quality=args.quality, rel_err=args.rel_err)

    with tempfile.TemporaryDirectory(prefix="comfy-mesh-demo-") as tmp:
        checkpoint = args.checkpoint or f"tiny:{args.seed}"
        model = open_model(checkpoint)
        config = model.config
        n_remote = (config.n_blocks + 1) // 2 if args.n_blocks_remote is None else args.n_blocks_remote
        plan = tail_split(config.n_blocks, n_remote, remote="demo-remote")
        inputs = make_inputs(config, args.size, args.text_tokens, args.seed, device)

        # All-local reference.
        whole = model.stage(BlockRange(0, config.n_blocks), first=True, last=True, device=device, dtype=dtype)
        local_final, local_times = sample(whole, inputs, args.steps)
        del whole
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the daemon process needs the room

        # Split: local front + daemon tail over ZeroMQ (a daemon of our own on loopback,
        # or the user's with --peer).
        with open(os.path.join(tmp, "daemon.log"), "w+") as daemon_log:
            daemon_ready_s = None
            if args.peer:
                proc, endpoint = None, peer_endpoint(args.peer)
            else:
                t0 = time.perf_counter()
                proc, endpoint = start_daemon(str(model.path), n_remote, device, dtype_name, daemon_log)
                daemon_ready_s = time.perf_counter() - t0
            try:
                client = DaemonClient(endpoint, name="demo", timeout_s=DAEMON_START_TIMEOUT_S)
                remote = RemoteStage(client, codec, measure_error=True, device=device)
                t0 = time.perf_counter()
                info = remote.connect(fingerprint=model.fingerprint)
                connect_s = time.perf_counter() - t0
                # One epoch past the daemon's: installs our split whatever it hosted before.
                plan = tail_split(config.n_blocks, n_remote, remote=info.node, epoch=info.epoch + 1)
                front = model.stage(plan.local, first=True, last=plan.is_last("local"), device=device, dtype=dtype)
                runner = SplitRunner(front, plan, {info.node: remote})
                split_final, split_times = sample(runner, inputs, args.steps)
                client.close()
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
        model.close()

    hops = [h for s in runner.stats for h in s.hops]
    steps = max(len(runner.stats), 1)
    bytes_per_step = sum(h.bytes_out + h.bytes_in for h in hops) / steps
    raw_per_step = sum(h.raw_bytes for h in hops) / steps
    errs = [h.rel_err for h in hops if h.rel_err is not None]
    ref = local_final.float()
    return {
        "model": f"flux2 hidden {config.hidden_size}, {config.depth_double}+{config.depth_single} blocks "
                 f"({model.path.name if args.checkpoint else 'tiny, generated'})",
        "peer": endpoint,
        "device": device, "dtype": dtype_name,
        "tokens": {"image": args.size * args.size, "text": args.text_tokens},
        "steps": args.steps,
        "n_blocks": config.n_blocks,
        "n_blocks_remote": n_remote,
        "codec": remote.codec.name,
        "codec_reason": remote.choice["reason"] if remote.choice else None,
        "quality": getattr(remote.codec.settings, "quality", getattr(remote.codec.settings, "rel_err", None)),
        "bytes_per_step": bytes_per_step,
        "raw_bytes_per_step": raw_per_step,
        "ratio": raw_per_step / bytes_per_step if bytes_per_step else None,
        "hop_rel_err": sum(errs) / len(errs) if errs else 0.0,
        "final_rel_err": float((split_final.float() - ref).norm() / ref.norm()),
        # The first step of each loop includes one-time work (warm-up, context upload): report the median.
        "local_step_s": _median(local_times),
        "split_step_s": _median(split_times),
        # One-time costs: the daemon's start (loading its blocks, warming its codec up) and
        # the client's HELLO and codec warm-up; then the first step, which should not pay them.
        "daemon_ready_s": daemon_ready_s, "connect_s": connect_s, "split_first_step_s": split_times[0],
    }


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def format_table(r: dict) -> str:
    rows = [
        ("model", r["model"]), ("device / dtype", f"{r['device']} / {r['dtype']}"),
        ("tokens", f"{r['tokens']['image']} image + {r['tokens']['text']} text"),
        ("steps", r["steps"]), ("split", f"{r['n_blocks'] - r['n_blocks_remote']} local + {r['n_blocks_remote']} remote"),
        ("codec", r["codec"] + (f" (quality {r['quality']})" if r["quality"] is not None else "")),
        ("wire bytes / step", f"{r['bytes_per_step'] / 1e6:.3f} MB (both directions)"),
        ("as bf16 / step", f"{r['raw_bytes_per_step'] / 1e6:.3f} MB"),
        ("ratio", f"{r['ratio']:.2f}x" if r["ratio"] else "-"),
        ("carry error per hop", f"{r['hop_rel_err']:.2e} (relative L2)"),
        ("final latent vs all-local", f"{r['final_rel_err']:.2e} (relative L2)"),
        ("step time local / split", f"{r['local_step_s'] * 1e3:.1f} ms / {r['split_step_s'] * 1e3:.1f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    result = run_demo(args)
    print(json.dumps(result, indent=None if args.json else 2) if args.json else format_table(result))
    return 0
