"""A remote stage as the client sees it: hidden state in, result out, over a DaemonClient.

It encodes the carry with the chosen codec, sends the generation's position ids only
the first time (or again when the daemon says it lost them), and reports what crossed
the wire for each step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass

import torch

from .. import codec as codecs
from ..codec.base import Codec, CodecError, CodecStateError, StreamState
from ..codec.negotiate import choose_for_peer, format_mismatches, local_capabilities
from ..splitter.context_hash import token_layout
from .client import DaemonClient, PeerRefused, PeerTimeout
from .protocol import ErrorCode, ForwardRequest, HelloReply

log = logging.getLogger(__name__)


@dataclass
class HopStats:
    """One crossing to a remote stage and back, for one step."""

    node: str
    bytes_out: int  # every byte sent (header and buffers)
    bytes_in: int  # every byte received
    raw_bytes: int  # the same tensors as bf16 (carry out, result back)
    rel_err: float | None  # ||decode(encode(carry)) - carry|| / ||carry||, when measured
    encode_s: float
    wire_s: float  # request sent to reply received, remote compute included
    remote_compute_s: float
    decode_s: float
    measure_s: float = 0.0  # spent measuring rel_err (a diagnostic, not part of the hop's cost)


class RemoteStage:
    def __init__(self, client: DaemonClient, codec: Codec | str = "auto", reply_codec: str | None = None,
                 measure_error: bool = False, device: str = "cpu", fast_link: bool = False):
        """`codec`: a Codec, or "auto" to negotiate one at `connect()` (codec/negotiate.py).
        `reply_codec`: how the daemon encodes what it sends back (default: the same codec
        with the same settings). `device`: where this end's tensors live (for auto)."""
        self.client = client
        self.device = device
        self.fast_link = fast_link
        self._set_codec(codec, reply_codec)
        self.measure_error = measure_error
        self.session = uuid.uuid4().hex[:16]
        self.info: HelloReply | None = None
        self.choice: dict | None = None  # {"codec", "reason"}: what was chosen and why
        if not isinstance(codec, str):
            self.choice = {"codec": codec.name, "reason": "chosen by the user"}
        self._ids_sent: set[str] = set()
        self._layouts: dict = {}
        # Codec streams, for codecs that code the change from the last message.
        self._carry_state, self._reply_state, self._measure_state = StreamState(), StreamState(), StreamState()
        self._reply_reset = True
        self._last_ids: str | None = None
        self._last_t: float | None = None

    @property
    def node(self) -> str:
        return self.info.node if self.info else "?"

    def _set_codec(self, codec: Codec | str, reply_codec: str | None) -> None:
        self.codec = codec
        if isinstance(codec, str):  # "auto": settled at connect()
            self.reply_codec, self.reply_settings = reply_codec, {}
            return
        self.reply_codec = reply_codec or codec.name
        same = self.reply_codec == codec.name and dataclasses.is_dataclass(getattr(codec, "settings", None))
        self.reply_settings = dataclasses.asdict(codec.settings) if same else {}

    def connect(self, fingerprint: str | None = None) -> HelloReply:
        _, decoders = local_capabilities()
        self.info = self.client.hello(fingerprint=fingerprint, codecs=decoders)
        if self.codec == "auto":
            info = self.info
            choice = choose_for_peer(self.client.endpoint, info, local_cuda=self.device.startswith("cuda"),
                                     fast_link=self.fast_link)
            log.info("codec for %s: %s", info.name, choice.reason)
            self.choice = {"codec": choice.carry, "reason": choice.reason}
            self._set_codec(codecs.get(choice.carry), choice.reply)
        else:
            if isinstance(self.codec, str):
                self._set_codec(codecs.get(self.codec), self.reply_codec)
            mismatched = format_mismatches(self.info.formats)
            for name in dict.fromkeys((self.codec.name, self.reply_codec)):
                if name in mismatched:  # refused now, not at the first message each way
                    raise CodecError(f"codec {name!r} cannot be used with {self.info.name}: {mismatched[name]}")
        self.warm_up(self.info.config)
        return self.info

    def warm_up(self, config: dict | None) -> None:
        """The codec's first-use work now, not inside the first sampler step (the gpu
        codec compiles its kernels per channel count: about a minute on a fresh machine):
        for the carry (the peer's hidden size) and, where replies come back in the same
        codec, the model output (its out_channels). Nothing to do for other codecs, on a
        CPU, or when the peer did not say its sizes."""
        if not config:
            return
        counts = [config.get("hidden_size")]
        if self.reply_codec == self.codec.name:
            counts.append(config.get("out_channels"))
        codecs.warm_up(self.codec, counts, self.device)

    def reconfigure(self, plan):
        return self.client.reconfigure(plan)

    def current_plan(self, timeout_s: float | None = None) -> dict | None:
        """The plan the daemon follows now (from STATUS), or None from a daemon too old to say."""
        return self.client.status(timeout_s=timeout_s).plan

    def forward(self, hidden: torch.Tensor, *, epoch: int, step: int, timestep: torch.Tensor,
                guidance: torch.Tensor | None, txt_ids: torch.Tensor, img_ids: torch.Tensor,
                ids_hash: str) -> tuple[torch.Tensor, str, HopStats]:
        new_generation = ids_hash != self._last_ids or (self._last_t is not None and
                                                          float(timestep.max()) > self._last_t)
        if new_generation:
            self._reset_streams()  # a new image: the previous one's references mean nothing
        self._last_ids, self._last_t = ids_hash, float(timestep.max())
        if ids_hash not in self._layouts:
            self._layouts[ids_hash] = token_layout(txt_ids, img_ids)
        layout = self._layouts[ids_hash]
        sent0, recv0 = self.client.bytes_sent, self.client.bytes_received
        t0 = time.perf_counter()
        send_ids = ids_hash not in self._ids_sent
        for attempt in range(3):
            carry = self.codec.encode(hidden, state=self._carry_state, layout=layout)
            t1 = time.perf_counter()
            body = ForwardRequest(epoch=epoch, session=self.session, step=step, timestep=timestep.float().tolist(),
                                  ids_hash=ids_hash,
                                  guidance=guidance.float().tolist() if guidance is not None else None,
                                  reply_codec=self.reply_codec, reply_settings=self.reply_settings,
                                  reply_reset=self._reply_reset, codec_choice=self.choice)
            tensors = {"carry": carry} | (self._ids_tensors(txt_ids, img_ids) if send_ids else {})
            try:
                reply = self.client.request(body, tensors)
                self._reply_reset = False
                t2 = time.perf_counter()
                result = codecs.decode(reply.tensors["result"], device=hidden.device, state=self._reply_state)
                break
            except PeerRefused as exc:
                if exc.code == ErrorCode.MISSING_CONTEXT and attempt < 2:
                    log.info("%s lost the position ids (restarted?); sending them again", self.node)
                    send_ids = True
                    self._carry_state.reset()  # it may have lost our stream too
                    self._reply_reset = True
                    continue
                if exc.code == ErrorCode.CODEC_STATE and attempt < 2:
                    log.info("%s lost our codec stream; starting it over with a key message", self.node)
                    self._reset_streams()
                    continue
                raise
            except CodecStateError:
                if attempt == 2:
                    raise
                log.info("reply from %s does not fit our stream state; asking for a key message", self.node)
                self._reset_streams()
            except PeerTimeout:
                self._reset_streams()  # we cannot know what the daemon kept: start over next time
                raise
        self._ids_sent.add(ids_hash)
        t3 = time.perf_counter()
        rel_err = self._measure(carry, hidden) if self.measure_error else None
        measure_s = time.perf_counter() - t3
        stats = HopStats(node=self.node, bytes_out=self.client.bytes_sent - sent0,
                         bytes_in=self.client.bytes_received - recv0,
                         raw_bytes=2 * (hidden.numel() + result.numel()), rel_err=rel_err, encode_s=t1 - t0,
                         wire_s=t2 - t1, remote_compute_s=reply.body.compute_s, decode_s=t3 - t2,
                         measure_s=measure_s)
        return result, reply.body.kind, stats

    def _reset_streams(self) -> None:
        self._carry_state.reset()
        self._reply_state.reset()
        self._measure_state.reset()
        self._reply_reset = True

    def _measure(self, carry, hidden: torch.Tensor) -> float:
        """The carry's relative error after the wire, decoding as the daemon does (a mirror state)."""
        try:
            restored = codecs.decode(carry, hidden.device, state=self._measure_state).float()
        except CodecStateError:  # the mirror missed a key message (a retry): resync on this one
            self._measure_state.reset()
            return float("nan")
        ref = hidden.float()
        return float((restored - ref).norm() / ref.norm().clamp_min(1e-30))

    @staticmethod
    def _ids_tensors(txt_ids: torch.Tensor, img_ids: torch.Tensor) -> dict:
        raw = codecs.get("raw")
        return {"txt_ids": raw.encode(txt_ids.float().cpu()), "img_ids": raw.encode(img_ids.float().cpu())}
