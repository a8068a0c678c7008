"""Memory figures for STATUS: the GPU's where there is one, else this process's."""

from __future__ import annotations

import torch


def memory_report(device: str, weight_bytes: int) -> dict:
    """{"kind", "used", "total", "weights"} in bytes.

    On CUDA, `used`/`total` are the whole card's (what matters to a user deciding how
    many blocks fit), from `cudaMemGetInfo`. Without a GPU, `used` is this process's
    resident memory and `total` the machine's RAM, labelled "process".
    """
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(dev)
        return {"kind": "cuda", "gpu": torch.cuda.get_device_name(dev), "used": total - free, "total": total,
                "weights": weight_bytes}
    import psutil

    return {"kind": "process", "gpu": None, "used": psutil.Process().memory_info().rss,
            "total": psutil.virtual_memory().total, "weights": weight_bytes}
