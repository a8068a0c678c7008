"""Content hash of a generation's position ids: the key both sides cache context by."""

from __future__ import annotations

import hashlib

import torch


def ids_hash(txt_ids: torch.Tensor, img_ids: torch.Tensor) -> str:
    """Over values, shapes and dtypes, so equal ids from different tensors hash the same.

    FORWARD requests name their generation's ids by this hash; the ids themselves
    cross once and are cached on the daemon (shared/DESIGN.md: cache by content).
    """
    h = hashlib.sha256()
    for t in (txt_ids, img_ids):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]
