"""The node's connection to one daemon: model check, plan, one remote call per model evaluation.

`PeerLink` knows nothing of ComfyUI. It says HELLO, checks that the daemon serves the
model ComfyUI loaded (fingerprint of the same checkpoint file, and the sizes), installs
a tail split (the daemon runs the last `n_blocks_remote` blocks and the final layer),
and then sends each hidden state through a `RemoteStage` and returns the model output.

Plans move at step boundaries, from either side:

- the node asks for a new `n_blocks_remote` (a new link, installed at connect);
- the panel moves the daemon (RECONFIGURE from elsewhere): the next FORWARD is refused
  with STALE_EPOCH and the daemon's plan; the link adopts it and raises `PlanMoved`, so
  the caller recomputes this step's front under the new split and calls again.

While the plan is all local no FORWARD goes out, so no refusal can say that the panel
gave the daemon blocks again: `poll_plan` asks the daemon's plan (STATUS, short deadline)
before such a step instead.

A daemon that restarted (older epoch, another node id, no blocks) gets this link's
plan again. Every failure leaves as a `MeshError` whose message says what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import zmq

from .. import codec as codecs
from ..codec.negotiate import local_capabilities
from ..daemon.client import DaemonClient, PeerError, PeerRefused
from ..daemon.protocol import ErrorCode
from ..daemon.remote_stage import RemoteStage
from ..splitter.context_hash import ids_hash
from ..splitter.errors import PlanError
from ..splitter.plan import Plan, tail_split
from . import status as st
from .errors import MeshError, bad_address, explain
from .peers import choose_codec

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # HELLO: a daemon answers it at once, even while loading blocks
REQUEST_TIMEOUT_S = 300.0  # FORWARD and RECONFIGURE (a daemon may be loading many GB of blocks)
PLAN_POLL_TIMEOUT_S = 1.0  # how long an all-local step waits to hear the daemon's plan (s)
PLAN_POLL_BACKOFF_S = 10.0  # after no answer, all-local steps go on without asking for this long (s)

# The sizes both sides must agree on (Flux2Config field names).
COMPARED_SIZES = ("hidden_size", "depth_double", "depth_single", "in_channels", "out_channels", "context_dim",
                  "guidance_embed")


class PlanMoved(Exception):
    """The split changed during this step (the panel moved it, or the daemon restarted):
    recompute the front up to the link's new `split` and call `forward` again."""


@dataclass
class ModelIdentity:
    """What the ComfyUI side knows of its model, to check that the daemon serves the same one."""

    sizes: dict  # COMPARED_SIZES -> value, from ComfyUI's model
    path: str | None = None  # the checkpoint file ComfyUI loaded, when known
    fingerprint: str | None = None  # SafetensorsCheckpoint.fingerprint() of that file
    note: str | None = None  # why there is no fingerprint, for a warning

    @property
    def n_blocks(self) -> int:
        return self.sizes["depth_double"] + self.sizes["depth_single"]

    @property
    def file_name(self) -> str:
        return pathlib.Path(self.path).name if self.path else "an unknown file"


_FINGERPRINTS: dict[tuple, str] = {}
_FINGERPRINTS_LOCK = threading.Lock()


def file_fingerprint(path: str) -> str:
    """The checkpoint's fingerprint (as a daemon computes it), cached by path, size and mtime."""
    from ..splitter.checkpoint import SafetensorsCheckpoint
    from ..splitter.flux2.config import FLUX2_MARKER_KEYS

    st_ = os.stat(path)
    key = (os.path.abspath(path), st_.st_size, st_.st_mtime_ns)
    with _FINGERPRINTS_LOCK:
        if key in _FINGERPRINTS:
            return _FINGERPRINTS[key]
    with SafetensorsCheckpoint(path, markers=FLUX2_MARKER_KEYS) as ckpt:
        fp = ckpt.fingerprint()
    with _FINGERPRINTS_LOCK:
        _FINGERPRINTS[key] = fp
    return fp


class _BoundRecorder:
    """A codec that remembers the error bound its last message stated (for status and tests)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.settings = getattr(inner, "settings", None)
        self.last_bound = 0.0

    def encode(self, tensor, *args, **kwargs):
        msg = self.inner.encode(tensor, *args, **kwargs)
        self.last_bound = msg.rel_err_bound
        return msg

    def __getattr__(self, name):  # everything else is the codec's own
        return getattr(self.inner, name)


def quality_rel_err(quality: float) -> float:
    """The node's `quality` as the gpu codec's `rel_err` target: 1 / (quality * sqrt(12)), the
    cpu codec's error at that quality (a step of spread / quality; 7 -> 0.041, 64 -> 0.0045)."""
    return min(0.5, 1.0 / (quality * math.sqrt(12.0)))


def make_codec(name: str, quality: float):
    """Codec `name` tuned by the node's `quality`: as is for codecs with a `quality` setting
    (cpu, x265, nvenc), as `rel_err` (`quality_rel_err`) for gpu; raw has no setting."""
    base = codecs.get(name)
    settings = getattr(base, "settings", None)
    fields = {f.name for f in dataclasses.fields(settings)} if dataclasses.is_dataclass(settings) else set()
    if "quality" in fields:
        return codecs.get(name, quality=quality)
    if "rel_err" in fields:
        return codecs.get(name, rel_err=quality_rel_err(quality))
    return base


@dataclass
class StepRecord:
    """One split model evaluation, as the link saw it."""

    step: int
    epoch: int
    n_blocks_remote: int
    batch: int
    bytes_out: int
    bytes_in: int
    raw_bytes: int  # the same tensors as bf16
    rel_err_bound: float  # the carry codec's stated bound for this step
    rel_err: float | None  # measured carry error, with measure_error
    wire_s: float  # request out to reply in, remote compute included
    remote_compute_s: float


@dataclass
class LinkSettings:
    key: str  # status board key (the ComfyUI node id)
    peer: str  # display name of the peer
    endpoint: str  # tcp://host:port
    n_blocks_remote: int  # what the node asks for
    codec: str = "raw"  # a codec name, or "auto": settled from both ends' codecs after HELLO
    quality: float = 7.0  # codec quality (see make_codec)
    local_cuda: bool = False  # the hidden state is on a CUDA device here (for "auto")
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    timeout_s: float = REQUEST_TIMEOUT_S
    measure_error: bool = False  # decode each carry locally to measure its error (tests, diagnostics)


class PeerLink:
    def __init__(self, settings: LinkSettings, identity: ModelIdentity, board: st.StatusBoard | None = None):
        self.settings = settings
        self.identity = identity
        self.board = board or st.BOARD
        self.plan: Plan | None = None
        self.info = None  # HelloReply
        self.records: list[StepRecord] = []
        self.steps = 0
        self.warnings: list[str] = []
        self._client: DaemonClient | None = None
        self._remote: RemoteStage | None = None
        self._codec: _BoundRecorder | None = None
        self.codec_reason = ""  # why this codec (auto's negotiation, or the node's choice)
        self._lock = threading.Lock()  # one model evaluation at a time per link
        self._poll_after = 0.0  # monotonic time before which all-local steps do not ask the plan
        self._poll_failed = False  # the last plan poll got no answer (logged once)
        self.board.open(settings.key, settings.peer, settings.endpoint)

    # ---------------------------------------------------------------- plan

    @property
    def n_blocks(self) -> int:
        return self.identity.n_blocks

    @property
    def split(self) -> int:
        """First block the peer runs under the current plan (== n_blocks: all local)."""
        return self.plan.local.end if self.plan is not None else self.n_blocks

    @property
    def n_blocks_remote(self) -> int:
        return self.n_blocks - self.split

    def connect(self) -> "PeerLink":
        """HELLO, check the model, install the node's plan. Raises MeshError."""
        s = self.settings
        if not 0 <= s.n_blocks_remote <= self.n_blocks:
            raise MeshError(f"comfy-mesh: n_blocks_remote must be in [0, {self.n_blocks}] for this model "
                            f"({self.identity.sizes['depth_double']} double + {self.identity.sizes['depth_single']} "
                            f"single blocks), got {s.n_blocks_remote}")
        self._update(state=st.CONNECTING, message="", codec=s.codec, n_blocks=self.n_blocks)
        try:
            with self._reporting(s.n_blocks_remote):
                try:  # no I/O yet (ZeroMQ connects in the background): a failure here is the address
                    self._client = DaemonClient(s.endpoint, timeout_s=s.timeout_s, name="comfy-mesh-comfyui")
                except (PeerError, zmq.ZMQError) as exc:
                    raise bad_address(exc, self._who()) from None
                info = self._hello()
                name, self.codec_reason = choose_codec(s.codec, s.endpoint, info, local_cuda=s.local_cuda)
                log.info("comfy-mesh: codec %s for %s (%s)", name, self._who(), self.codec_reason)
                self._codec = _BoundRecorder(make_codec(name, s.quality))
                # The reply (the model output, 1/20 of the carry or less) comes back raw: exact, so
                # the only lossy step of a split is the carry, whose bound each message states.
                self._remote = RemoteStage(self._client, self._codec, reply_codec="raw", measure_error=s.measure_error,
                                           device="cuda" if s.local_cuda else "cpu")
                self._remote.info = info
                self._remote.warm_up(info.config)  # replies come back raw: the carry's size only
                self._update(codec=name)
                self.install(s.n_blocks_remote)
        except BaseException:
            self._drop_client()  # no socket left behind per failed prompt; the board keeps the error
            raise
        return self

    @contextlib.contextmanager
    def _reporting(self, n_blocks_remote: int):
        """Every failure inside leaves as a MeshError that says what to do, shown on the board."""
        try:
            yield
        except MeshError as exc:
            self._fail(exc)
            raise
        except (PeerError, PlanError, ValueError, zmq.ZMQError) as exc:
            err = explain(exc, self._who(), n_blocks_remote)
            self._fail(err)
            raise err from None

    def _who(self) -> str:
        name = getattr(self.info, "name", None)
        where = self.settings.endpoint.removeprefix("tcp://")
        return f"{name} ({where})" if name else where

    def _hello(self):
        _, decoders = local_capabilities()
        info = self._client.hello(codecs=decoders, timeout_s=self.settings.connect_timeout_s)
        self.info = info
        if self._remote is not None:
            self._remote.info = info
        self._check_model(info)
        self._update(node=info.node, peer_name=info.name, device=info.device, model=info.model,
                     warnings=list(self.warnings))
        return info

    def _check_model(self, info) -> None:
        ident = self.identity
        theirs = pathlib.Path(info.model).name if info.model else None
        if not info.fingerprint or not info.config:
            raise MeshError(
                f"comfy-mesh: peer {self._who()} is not hosting a model. Start it with the checkpoint ComfyUI "
                f"loaded: comfy-mesh daemon --model <path to {ident.file_name}> --host 0.0.0.0")
        if info.family not in (None, "flux2"):
            raise MeshError(f"comfy-mesh: peer {self._who()} serves a {info.family} model ({theirs}); this node "
                            "splits FLUX.2. Start the daemon with the FLUX.2 checkpoint ComfyUI loaded.")
        if ident.fingerprint is not None and info.fingerprint != ident.fingerprint:
            raise MeshError(
                f"comfy-mesh: model mismatch: ComfyUI loaded {ident.file_name} (fingerprint {ident.fingerprint[:12]}), "
                f"but peer {self._who()} serves {theirs} (fingerprint {info.fingerprint[:12]}). Restart the daemon "
                f"with the same file: comfy-mesh daemon --model <path to {ident.file_name}> (or a copy with the "
                "same fingerprint), or load the daemon's file in ComfyUI.")
        diffs = [f"{k} {ident.sizes[k]} here vs {info.config.get(k)} there" for k in COMPARED_SIZES
                 if k in info.config and info.config[k] != ident.sizes[k]]
        if diffs:
            raise MeshError(
                f"comfy-mesh: model mismatch: peer {self._who()} serves {theirs}, whose sizes differ from the model "
                f"ComfyUI loaded ({ident.file_name}): {'; '.join(diffs)}. Start the daemon with "
                f"comfy-mesh daemon --model <path to {ident.file_name}>.")
        if ident.fingerprint is None:
            note = (f"could not fingerprint the checkpoint ComfyUI loaded ({ident.note}); only the model sizes were "
                    f"checked: make sure {theirs} on the peer holds the same weights")
            if note not in self.warnings:
                self.warnings.append(note)
                log.warning("comfy-mesh: %s", note)

    def install(self, n_blocks_remote: int) -> Plan:
        """Send this link's tail split (epoch above any seen) to the daemon."""
        epoch = max(self.plan.epoch if self.plan else 0, self.info.epoch) + 1
        plan = tail_split(self.n_blocks, n_blocks_remote, remote=self.info.node, epoch=epoch)
        try:
            reply = self._remote.reconfigure(plan)
        except PeerRefused as exc:
            if exc.code == ErrorCode.STALE_EPOCH and exc.plan:  # someone moved it meanwhile: go above that
                self.info.epoch = int(exc.plan.get("epoch", epoch))
                return self.install(n_blocks_remote)
            raise
        self.plan = plan
        log.info("comfy-mesh: plan epoch %d: blocks [0, %d) here, [%d, %d) on %s (loaded %.1f MB in %.2f s)",
                 plan.epoch, plan.local.end, plan.local.end, self.n_blocks, self._who(), reply.loaded_bytes / 1e6,
                 reply.seconds)
        self._update(state=st.CONNECTED, epoch=plan.epoch, n_blocks_remote=plan.n_blocks_remote, message="")
        return plan

    def _adopt(self, plan_dict: dict) -> None:
        """Follow a plan the daemon reports (the panel moved it), or re-install ours if it is older."""
        try:
            plan = Plan.from_dict(plan_dict)
        except PlanError as exc:
            raise MeshError(f"comfy-mesh: peer {self._who()} reported an unreadable plan: {exc}") from None
        if plan.epoch < self.plan.epoch or (plan.remotes and plan.range_of(self.info.node) is None):
            log.info("comfy-mesh: %s reports plan epoch %d (ours %d): restarted? re-installing ours", self._who(),
                     plan.epoch, self.plan.epoch)
            self._hello()  # a restarted daemon may have a new node id
            self.install(self.plan.n_blocks_remote)
            return
        if plan.n_blocks != self.n_blocks:
            raise MeshError(f"comfy-mesh: peer {self._who()} follows a plan for {plan.n_blocks} blocks; this model has "
                            f"{self.n_blocks}. Is it serving another checkpoint now?")
        if len(plan.remotes) > 1:
            raise MeshError(f"comfy-mesh: peer {self._who()} follows a chain plan over {len(plan.remotes)} nodes; this "
                            "node splits to one peer. Move the split back to one peer in the panel.")
        log.info("comfy-mesh: %s moved to plan epoch %d: %d blocks remote (was %d)", self._who(), plan.epoch,
                 plan.n_blocks_remote, self.plan.n_blocks_remote)
        self.plan = plan
        self._update(epoch=plan.epoch, n_blocks_remote=plan.n_blocks_remote)

    # ---------------------------------------------------------------- runs

    def begin_run(self) -> None:
        """At the start of a sampling run: new context session; catch up with a restarted or moved daemon."""
        if self._remote is None:
            raise MeshError("comfy-mesh: this split's connection was closed; queue the prompt again")
        self._remote.session = uuid.uuid4().hex[:16]  # context stays cached by content hash across runs
        self._poll_after = 0.0  # a new run asks a silent daemon again
        with self._reporting(self.n_blocks_remote):
            old = self.info
            info = self._hello()
            if info.node != old.node or info.epoch < self.plan.epoch:
                self.install(self.plan.n_blocks_remote)  # restarted: it lost our plan
            elif info.epoch > self.plan.epoch:
                self._sync_from_hello(info)
        self._update(state=st.RUNNING, message="")

    def poll_plan(self) -> bool:
        """Before an all-local step: ask the daemon's plan (STATUS, short deadline) and adopt a
        newer one, since no FORWARD goes out to be refused. True when the split moved (run the
        step under the new one). A daemon that does not answer is skipped (logged once) and
        not asked again for PLAN_POLL_BACKOFF_S; the step goes on all local."""
        if self._remote is None or time.monotonic() < self._poll_after:
            return False
        with self._lock:
            before = self.plan
            try:
                plan = self._remote.current_plan(timeout_s=PLAN_POLL_TIMEOUT_S)
            except (PeerError, zmq.ZMQError) as exc:
                if not self._poll_failed:
                    log.warning("comfy-mesh: cannot ask %s for its plan (%s); going on all local", self._who(), exc)
                    self._poll_failed = True
                self._poll_after = time.monotonic() + PLAN_POLL_BACKOFF_S
                return False
            self._poll_failed = False
            if plan is None or int(plan.get("epoch", -1)) <= before.epoch:
                return False
            with self._reporting(before.n_blocks_remote):
                self._adopt(plan)
            return self.plan != before

    def _sync_from_hello(self, info) -> None:
        hosted = info.hosted
        n_remote = 0 if hosted is None else hosted[1] - hosted[0]
        if hosted is not None and (hosted[1] != self.n_blocks or not info.last):
            raise MeshError(f"comfy-mesh: peer {self._who()} hosts blocks {hosted} in the middle of a chain; this node "
                            "splits to one peer that runs the tail. Move the split back in the panel.")
        self.plan = tail_split(self.n_blocks, n_remote, remote=info.node, epoch=info.epoch)
        log.info("comfy-mesh: %s is at plan epoch %d (%d blocks remote); following it", self._who(), info.epoch, n_remote)
        self._update(epoch=info.epoch, n_blocks_remote=n_remote)

    def end_run(self) -> None:
        self._update(state=st.CONNECTED)

    def forward(self, hidden: torch.Tensor, *, timestep: torch.Tensor, guidance: torch.Tensor | None,
                txt_ids: torch.Tensor, img_ids: torch.Tensor) -> torch.Tensor:
        """The daemon's output for `hidden` ([txt; img] after block split-1): (B, n_img, C).

        Raises PlanMoved when the split changed (recompute the front and call again)."""
        if self._remote is None:
            raise MeshError("comfy-mesh: this split's connection was closed; queue the prompt again")
        with self._lock:
            plan = self.plan
            if not plan.remotes:
                raise PlanMoved()
            key = ids_hash(txt_ids, img_ids)
            try:
                out, kind, hop = self._remote.forward(hidden, epoch=plan.epoch, step=self.steps, timestep=timestep,
                                                      guidance=guidance, txt_ids=txt_ids, img_ids=img_ids, ids_hash=key)
            except PeerRefused as exc:
                # Recovery talks to the daemon again: its failures get advice and the board too.
                if exc.code == ErrorCode.STALE_EPOCH and exc.plan:
                    with self._reporting(plan.n_blocks_remote):
                        self._adopt(exc.plan)
                    raise PlanMoved() from None
                if exc.code == ErrorCode.NOT_HOSTING:
                    with self._reporting(plan.n_blocks_remote):
                        self.install(plan.n_blocks_remote)
                    raise PlanMoved() from None
                err = explain(exc, self._who(), plan.n_blocks_remote)
                self._fail(err)
                raise err from None
            except PeerError as exc:
                err = explain(exc, self._who(), plan.n_blocks_remote)
                self._fail(err)
                raise err from None
            if kind != "output":
                raise MeshError(f"comfy-mesh: peer {self._who()} returned a {kind} instead of the model output; it "
                                "should run the last blocks and the final layer. Restart the daemon.")
            rec = StepRecord(step=self.steps, epoch=plan.epoch, n_blocks_remote=plan.n_blocks_remote,
                             batch=hidden.shape[0], bytes_out=hop.bytes_out, bytes_in=hop.bytes_in,
                             raw_bytes=hop.raw_bytes, rel_err_bound=self._codec.last_bound, rel_err=hop.rel_err,
                             wire_s=hop.wire_s, remote_compute_s=hop.remote_compute_s)
            self.records.append(rec)
            del self.records[:-1000]  # bounded: a long-lived ComfyUI runs many generations
            self.steps += 1
        return out

    def record_step_time(self, seconds: float) -> None:
        rec = self.records[-1] if self.records else None
        self._update(show=self.steps <= 1 or self.steps % 5 == 0, steps=self.steps, step_s=seconds,
                     bytes_per_step=(rec.bytes_out + rec.bytes_in) if rec else 0,
                     raw_bytes_per_step=rec.raw_bytes if rec else 0)

    # ---------------------------------------------------------------- plumbing

    def _update(self, show: bool = True, **changes) -> None:
        self.board.update(self.settings.key, show=show, **changes)

    def _fail(self, exc: BaseException) -> None:
        self._update(state=st.ERROR, message=str(exc))

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = self._remote = None

    def close(self) -> None:
        self._drop_client()
        self.board.close(self.settings.key)


def _identity_sizes(params) -> dict:
    """COMPARED_SIZES from ComfyUI's FluxParams (duck-typed: no ComfyUI import here)."""
    patch = int(getattr(params, "patch_size", 1))
    return {
        "hidden_size": int(params.hidden_size),
        "depth_double": int(params.depth),
        "depth_single": int(params.depth_single_blocks),
        "in_channels": int(params.in_channels) * patch * patch,
        "out_channels": int(params.out_channels) * patch * patch,
        "context_dim": int(params.context_in_dim),
        "guidance_embed": bool(params.guidance_embed),
    }


def identity_of(params, path: str | None, note: str | None = None) -> ModelIdentity:
    """The identity of a ComfyUI FLUX.2 model: sizes from its params, fingerprint from its file."""
    sizes = _identity_sizes(params)
    if path is None:
        return ModelIdentity(sizes, None, None, note or "ComfyUI does not say which file this model came from")
    if not str(path).endswith(".safetensors"):
        return ModelIdentity(sizes, path, None, f"{pathlib.Path(path).name} is not a .safetensors file")
    try:
        return ModelIdentity(sizes, path, file_fingerprint(path))
    except (OSError, ValueError) as exc:
        return ModelIdentity(sizes, path, None, f"reading {pathlib.Path(path).name} failed: {exc}")

