"""What a daemon hosts and how it answers requests, without any socket.

`ModelHost` owns the model file, the stage for this node's blocks under the current
plan, a small cache of per-generation context (position ids and their RoPE tables,
keyed by content hash), and the counters STATUS reports. The server feeds it parsed
messages on one worker thread and sends back whatever message it returns.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import torch

from .. import __version__
from .. import codec as codecs
from ..codec.base import CodecError, CodecStateError, StreamState, TokenLayout
from ..codec.negotiate import local_capabilities
from ..splitter.context_hash import ids_hash, token_layout
from ..splitter.errors import PlanError
from ..splitter.model_file import ModelFile
from ..splitter.plan import BlockRange, Plan, tail_split
from .memory import memory_report
from .protocol import (
    ErrorCode, ForwardReply, ForwardRequest, HelloReply, HelloRequest, Message, ProtocolError, ReconfigureReply,
    ReconfigureRequest, StatusReply, StatusRequest, PROTOCOL_VERSION, error_message,
)

log = logging.getLogger(__name__)

CONTEXT_CACHE_SIZE = 8  # generations whose ids/RoPE tables stay cached
STREAM_CACHE_SIZE = 16  # client sessions whose codec stream states stay kept


@dataclass
class HostSettings:
    node_id: str  # the name plans give this node
    name: str  # human-readable
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_message_bytes: int = 1 << 30  # bytes; larger requests are refused with TOO_LARGE


class Counters:
    """Thread-safe request and traffic counters for STATUS."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.errors = self.forward_steps = 0
        self.bytes_in = self.bytes_out = 0
        self.step_last = 0.0
        self.step_total = 0.0
        self.raw_bytes = self.wire_bytes = 0  # FORWARD tensors as bf16 / as encoded (STATUS's codec ratio)
        self.started = time.monotonic()

    def record(self, bytes_in: int, bytes_out: int, is_error: bool):
        with self.lock:
            self.requests += 1
            self.errors += int(is_error)
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out

    def record_step(self, seconds: float, raw_bytes: int = 0, wire_bytes: int = 0):
        with self.lock:
            self.forward_steps += 1
            self.step_last = seconds
            self.step_total += seconds
            self.raw_bytes += raw_bytes
            self.wire_bytes += wire_bytes


class ModelHost:
    def __init__(self, model: ModelFile, settings: HostSettings, n_blocks_hosted: int = 0):
        self.model = model
        self.settings = settings
        self.counters = Counters()
        self.state = "loading"
        n = model.config.n_blocks
        if not 0 <= n_blocks_hosted <= n:
            raise PlanError(f"--blocks must be in [0, {n}] for this model, got {n_blocks_hosted}")
        self.plan: Plan = tail_split(n, n_blocks_hosted, remote=settings.node_id, epoch=0)
        self.stage = None
        self.weight_bytes = 0  # kept here so STATUS never walks modules the worker is changing
        self.loading: dict | None = None  # {"done", "total"} bytes of the weights being read, for STATUS
        self._reply_codecs: dict = {}
        self._streams: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self.codec_choice: dict | None = None  # the last client's codec and why, for STATUS
        self._contexts: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self._apply_plan(self.plan)
        local_capabilities()  # probe codecs now (NVENC takes ~0.5 s), not in the first HELLO

    def warm_up_codecs(self) -> None:
        """Compile the gpu codec's kernels for this model's carries now, before the daemon
        says it is ready (codec.warm_up). Call it on the thread that will run the codec:
        the server's worker."""
        if "gpu" in codecs.available():
            # The carry (hidden size), and the model output the last stage sends back:
            # Triton compiles per channel count.
            c = self.model.config
            codecs.warm_up(codecs.get("gpu"), (c.hidden_size, c.out_channels), self.settings.device,
                           self.settings.dtype)

    # ---------------------------------------------------------------- plan

    @property
    def hosted(self) -> BlockRange | None:
        return self.plan.range_of(self.settings.node_id)

    @property
    def is_last(self) -> bool:
        return self.hosted is not None and self.plan.is_last(self.settings.node_id)

    def _apply_plan(self, plan: Plan) -> tuple[int, float]:
        """Load and drop blocks so this node hosts its range in `plan`; returns (bytes loaded, s)."""
        blocks = plan.range_of(self.settings.node_id)
        self.state = "loading"
        self.loading = {"done": 0, "total": 0}
        try:
            if blocks is None:
                self.stage = None  # hosts nothing: free every weight
                if torch.device(self.settings.device).type == "cuda":
                    torch.cuda.empty_cache()
                loaded, seconds = 0, 0.0
            elif self.stage is None:
                t0 = time.perf_counter()
                self.stage = self.model.stage(blocks, first=False, last=plan.is_last(self.settings.node_id),
                                              device=self.settings.device, dtype=self.settings.dtype,
                                              show_progress=True, on_progress=self._on_load_progress)
                loaded, seconds = self.stage.weight_bytes(), time.perf_counter() - t0
            else:
                change = self.stage.set_range(blocks, first=False, last=plan.is_last(self.settings.node_id))
                loaded, seconds = change.loaded_bytes, change.seconds
        finally:
            self.loading = None
            self.state = "serving" if self.stage is not None else "idle"
            self.weight_bytes = self.stage.weight_bytes() if self.stage is not None else 0
        self.plan = plan
        return loaded, seconds

    def _on_load_progress(self, done: int, total: int, key: str) -> None:
        self.loading = {"done": done, "total": total}  # bytes of the weights being read, for STATUS

    # ---------------------------------------------------------------- requests

    def handle(self, msg: Message) -> Message:
        """Answer one request; never raises (errors become ERROR replies)."""
        try:
            reply = self._dispatch(msg)
        except ProtocolError as exc:
            reply = error_message(exc.code, exc.message, msg.id, exc.plan)
        except (PlanError, CodecError) as exc:
            reply = error_message(ErrorCode.BAD_REQUEST, str(exc), msg.id)
        except torch.OutOfMemoryError as exc:
            if torch.device(self.settings.device).type == "cuda":
                torch.cuda.empty_cache()
            reply = error_message(ErrorCode.OOM, f"{self.settings.name} ran out of GPU memory: {exc}. "
                                                 "Host fewer blocks here (lower n_blocks_remote) or free the GPU",
                                  msg.id)
        except Exception as exc:  # a bug must not take the daemon down; log it and answer
            log.exception("internal error answering %s", msg.type)
            reply = error_message(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc} (see the daemon log)", msg.id)
        reply.id = msg.id
        return reply

    def _dispatch(self, msg: Message) -> Message:
        body = msg.body
        if isinstance(body, HelloRequest):
            return self.hello(body)
        if isinstance(body, ForwardRequest):
            return self.forward(body, msg.tensors)
        if isinstance(body, ReconfigureRequest):
            return self.reconfigure(body)
        if isinstance(body, StatusRequest):
            return Message(self.status())
        raise ProtocolError(ErrorCode.MALFORMED, f"a daemon does not accept {msg.type} messages")

    def hello(self, req: HelloRequest) -> Message:
        if req.proto != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.VERSION, f"client speaks protocol {req.proto}, daemon {PROTOCOL_VERSION}")
        if req.fingerprint is not None and req.fingerprint != self.model.fingerprint:
            raise ProtocolError(
                ErrorCode.FINGERPRINT,
                f"model mismatch: daemon {self.settings.name} serves {self.model.path.name} (fingerprint "
                f"{self.model.fingerprint[:12]}), the client's model has fingerprint {req.fingerprint[:12]}; "
                "load the same checkpoint file on both sides")
        hosted = self.hosted
        encoders, decoders = local_capabilities()
        return Message(HelloReply(
            node=self.settings.node_id, name=self.settings.name, proto=PROTOCOL_VERSION, model=self.model.spec,
            fingerprint=self.model.fingerprint, family=self.model.family, config=self.model.config.to_dict(),
            n_blocks=self.model.config.n_blocks, hosted=hosted.to_list() if hosted else None, last=self.is_last,
            epoch=self.plan.epoch, codecs=codecs.available(), device=self.settings.device,
            max_message_bytes=self.settings.max_message_bytes, encoders=encoders, decoders=decoders,
            formats=codecs.formats()))

    def reconfigure(self, req: ReconfigureRequest) -> Message:
        plan = Plan.from_dict(req.plan)
        if plan.n_blocks != self.model.config.n_blocks:
            raise PlanError(f"plan is for {plan.n_blocks} blocks, this model has {self.model.config.n_blocks}")
        if plan.epoch < self.plan.epoch or (plan.epoch == self.plan.epoch and plan != self.plan):
            raise _stale(self.plan, f"plan epoch {plan.epoch} is not newer than the current {self.plan.epoch}")
        loaded, seconds = self._apply_plan(plan) if plan != self.plan else (0, 0.0)
        hosted = self.hosted
        log.info("plan epoch %d: hosting %s", plan.epoch, hosted)
        return Message(ReconfigureReply(epoch=plan.epoch, hosted=hosted.to_list() if hosted else None,
                                        last=self.is_last, loaded_bytes=loaded, seconds=seconds))

    def _context(self, req: ForwardRequest, tensors: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(txt_ids, img_ids, RoPE table) for this generation, from the request or the cache."""
        if "txt_ids" in tensors and "img_ids" in tensors:
            txt_ids = codecs.decode(tensors["txt_ids"])
            img_ids = codecs.decode(tensors["img_ids"])
            if ids_hash(txt_ids, img_ids) != req.ids_hash:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "ids_hash does not match the position ids sent")
            self._contexts[req.ids_hash] = (txt_ids, img_ids, self.stage.rope(txt_ids, img_ids))
            while len(self._contexts) > CONTEXT_CACHE_SIZE:
                self._contexts.popitem(last=False)
        if req.ids_hash not in self._contexts:
            raise ProtocolError(ErrorCode.MISSING_CONTEXT, f"position ids {req.ids_hash} are not cached here; resend them")
        self._contexts.move_to_end(req.ids_hash)
        return self._contexts[req.ids_hash]

    def forward(self, req: ForwardRequest, tensors: dict) -> Message:
        if req.epoch != self.plan.epoch:
            raise _stale(self.plan, f"request made under plan epoch {req.epoch}, current is {self.plan.epoch}")
        if self.stage is None:
            raise ProtocolError(ErrorCode.NOT_HOSTING, "this daemon hosts no blocks under the current plan")
        if "carry" not in tensors:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "FORWARD without a 'carry' tensor")
        reply_codec = self._reply_codec(req.reply_codec, req.reply_settings)
        t0 = time.perf_counter()
        txt_ids, img_ids, pe = self._context(req, tensors)
        carry_state, reply_state = self._streams_of(req.session)
        if req.reply_reset:
            reply_state.reset()
        if req.codec_choice is not None:
            self.codec_choice = req.codec_choice
        try:
            hidden = codecs.decode(tensors["carry"], device=self.settings.device, state=carry_state)
        except CodecStateError as exc:
            carry_state.reset()
            raise ProtocolError(ErrorCode.CODEC_STATE, str(exc)) from None
        c = self.model.config
        if hidden.ndim != 3 or hidden.shape[-1] != c.hidden_size or hidden.shape[1] != txt_ids.shape[1] + img_ids.shape[1]:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"carry of shape {tuple(hidden.shape)} does not fit this model (hidden {c.hidden_size}) "
                                f"and {txt_ids.shape[1]}+{img_ids.shape[1]} tokens")
        if len(req.timestep) != hidden.shape[0]:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{len(req.timestep)} timesteps for a batch of {hidden.shape[0]}")
        t1 = time.perf_counter()
        timestep = torch.tensor(req.timestep, dtype=torch.float32)
        guidance = torch.tensor(req.guidance, dtype=torch.float32) if req.guidance is not None else None
        ctx = self.stage.context(timestep, guidance, txt_ids, img_ids, pe=pe)
        out = self.stage.run_blocks(hidden, ctx)
        kind = "hidden"
        if self.is_last:
            out, kind = self.stage.finish(out, ctx), "output"
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        t2 = time.perf_counter()
        layout = token_layout(txt_ids, img_ids)
        if layout is not None and kind == "output":
            layout = TokenLayout(0, layout.h, layout.w)  # the final layer returns image tokens only
        encoded = reply_codec.encode(out, state=reply_state, layout=layout)
        t3 = time.perf_counter()
        self.counters.record_step(t2 - t1, raw_bytes=2 * (hidden.numel() + out.numel()),
                                  wire_bytes=tensors["carry"].nbytes + encoded.nbytes)
        return Message(ForwardReply(step=req.step, kind=kind, decode_s=t1 - t0, compute_s=t2 - t1, encode_s=t3 - t2),
                       tensors={"result": encoded})

    def _streams_of(self, session: str) -> tuple[StreamState, StreamState]:
        """(carry decoder, reply encoder) stream states of one client session."""
        if session not in self._streams:
            if len(self._streams) >= STREAM_CACHE_SIZE:
                self._streams.popitem(last=False)
            self._streams[session] = (StreamState(), StreamState())
        self._streams.move_to_end(session)
        return self._streams[session]

    def _reply_codec(self, name: str, settings: dict):
        key = (name, tuple(sorted(settings.items())))
        if key not in self._reply_codecs:
            if len(self._reply_codecs) >= 16:  # settings come from clients: keep the cache bounded
                self._reply_codecs.clear()
            self._reply_codecs[key] = codecs.get(name, **settings)  # CodecError -> BAD_REQUEST
        return self._reply_codecs[key]

    def status(self) -> StatusReply:
        cnt = self.counters
        hosted = self.hosted
        with cnt.lock:
            mean = cnt.step_total / cnt.forward_steps if cnt.forward_steps else 0.0
            return StatusReply(
                node=self.settings.node_id, name=self.settings.name, state=self.state, model=self.model.spec,
                hosted=hosted.to_list() if hosted else None, last=self.is_last, epoch=self.plan.epoch,
                device=self.settings.device,
                memory=memory_report(self.settings.device, self.weight_bytes),
                requests=cnt.requests, errors=cnt.errors, forward_steps=cnt.forward_steps,
                step_s={"last": cnt.step_last, "mean": mean}, bytes_in=cnt.bytes_in, bytes_out=cnt.bytes_out,
                uptime_s=time.monotonic() - cnt.started, codecs=codecs.available(),
                raw_bytes=cnt.raw_bytes, wire_bytes=cnt.wire_bytes, loading=self.loading, plan=self.plan.to_dict(),
                software=__version__, codec=self.codec_choice)


def _stale(plan: Plan, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.STALE_EPOCH, f"{why}; adopt the plan in this reply and retry", plan.to_dict())
