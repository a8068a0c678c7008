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
from ..codec.base import Codec
from .client import DaemonClient, PeerRefused
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


class RemoteStage:
    def __init__(self, client: DaemonClient, codec: Codec, reply_codec: str | None = None,
                 measure_error: bool = False):
        """`reply_codec`: how the daemon encodes what it sends back (default: the same codec,
        with the daemon's default settings for it)."""
        self.client = client
        self.codec = codec
        self.reply_codec = reply_codec or codec.name
        same = self.reply_codec == codec.name and dataclasses.is_dataclass(getattr(codec, "settings", None))
        self.reply_settings = dataclasses.asdict(codec.settings) if same else {}
        self.measure_error = measure_error
        self.session = uuid.uuid4().hex[:16]
        self.info: HelloReply | None = None
        self._ids_sent: set[str] = set()

    @property
    def node(self) -> str:
        return self.info.node if self.info else "?"

    def connect(self, fingerprint: str | None = None) -> HelloReply:
        self.info = self.client.hello(fingerprint=fingerprint, codecs=codecs.available())
        return self.info

    def reconfigure(self, plan):
        return self.client.reconfigure(plan)

    def forward(self, hidden: torch.Tensor, *, epoch: int, step: int, timestep: torch.Tensor,
                guidance: torch.Tensor | None, txt_ids: torch.Tensor, img_ids: torch.Tensor,
                ids_hash: str) -> tuple[torch.Tensor, str, HopStats]:
        t0 = time.perf_counter()
        carry = self.codec.encode(hidden)
        rel_err = None
        if self.measure_error:
            restored = codecs.decode(carry).to(hidden.device, torch.float32)
            ref = hidden.float()
            rel_err = float((restored - ref).norm() / ref.norm().clamp_min(1e-30))
        t1 = time.perf_counter()
        body = ForwardRequest(epoch=epoch, session=self.session, step=step, timestep=timestep.float().tolist(),
                              ids_hash=ids_hash, guidance=guidance.float().tolist() if guidance is not None else None,
                              reply_codec=self.reply_codec, reply_settings=self.reply_settings)
        sent0, recv0 = self.client.bytes_sent, self.client.bytes_received
        tensors = {"carry": carry}
        if ids_hash not in self._ids_sent:
            tensors |= self._ids_tensors(txt_ids, img_ids)
        try:
            reply = self.client.request(body, tensors)
        except PeerRefused as exc:
            if exc.code != ErrorCode.MISSING_CONTEXT:
                raise
            log.info("%s lost the position ids (restarted?); sending them again", self.node)
            reply = self.client.request(body, {"carry": carry} | self._ids_tensors(txt_ids, img_ids))
        self._ids_sent.add(ids_hash)
        t2 = time.perf_counter()
        result = codecs.decode(reply.tensors["result"], device=hidden.device)
        t3 = time.perf_counter()
        stats = HopStats(node=self.node, bytes_out=self.client.bytes_sent - sent0,
                         bytes_in=self.client.bytes_received - recv0,
                         raw_bytes=2 * (hidden.numel() + result.numel()), rel_err=rel_err, encode_s=t1 - t0,
                         wire_s=t2 - t1, remote_compute_s=reply.body.compute_s, decode_s=t3 - t2)
        return result, reply.body.kind, stats

    @staticmethod
    def _ids_tensors(txt_ids: torch.Tensor, img_ids: torch.Tensor) -> dict:
        raw = codecs.get("raw")
        return {"txt_ids": raw.encode(txt_ids.float().cpu()), "img_ids": raw.encode(img_ids.float().cpu())}
