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


def token_layout(txt_ids: torch.Tensor, img_ids: torch.Tensor):
    """Where the carry's tokens sit, from FLUX position ids: text first, then the image
    grid (ids axis 1 = row, axis 2 = column). None when the image tokens are not one full
    row-major grid (reference images appended, for example): codecs then skip the grid."""
    from ..codec.base import TokenLayout

    n_txt, n_img = txt_ids.shape[1], img_ids.shape[1]
    if n_img == 0:
        return TokenLayout(n_txt, 0, 0)
    ids = img_ids[0].to("cpu")
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != n_img or int(ids[:, 1].min()) != 0 or int(ids[:, 2].min()) != 0:
        return None
    rows = torch.arange(n_img) // w
    cols = torch.arange(n_img) % w
    if not (torch.equal(ids[:, 1].long(), rows) and torch.equal(ids[:, 2].long(), cols)):
        return None
    return TokenLayout(n_txt, h, w)
