"""Memory figures for STATUS and the peer record: the GPU's where there is one, else this process's."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def memory_report(device: str, weight_bytes: int) -> dict:
    """{"kind", "gpu", "used", "total", "weights", "source"}, sizes in bytes.

    On CUDA, `used`/`total` are the whole card's (what matters to a user deciding how
    many blocks fit, other processes included): from NVML through torch.cuda where
    pynvml is installed (it needs no CUDA context, so an idle daemon does not take
    VRAM just by reporting), else from `cudaMemGetInfo`. Without a GPU, `used` is this
    process's resident memory and `total` the machine's RAM, labelled kind "process".
    """
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        used_total = _nvml_memory(index)
        source = "nvml"
        if used_total is None:
            free, total = torch.cuda.mem_get_info(index)
            used_total, source = (total - free, total), "cudaMemGetInfo"
        used, total = used_total
        return {"kind": "cuda", "gpu": torch.cuda.get_device_name(index), "used": used, "total": total,
                "weights": weight_bytes, "source": source}
    import psutil

    return {"kind": "process", "gpu": None, "used": psutil.Process().memory_info().rss,
            "total": psutil.virtual_memory().total, "weights": weight_bytes, "source": "psutil"}


_nvml_failed = False  # NVML missing or broken: don't retry (and log) on every STATUS


def _nvml_memory(index: int) -> tuple[int, int] | None:
    """(used, total) bytes of CUDA device `index` from NVML, or None where NVML is unavailable."""
    global _nvml_failed
    if _nvml_failed or not hasattr(torch.cuda, "device_memory_used"):
        return None
    try:
        used = int(torch.cuda.device_memory_used(index))  # NVML; maps CUDA_VISIBLE_DEVICES for us
        total = int(torch.cuda.get_device_properties(index).total_memory)
    except Exception as exc:  # pynvml not installed, or no NVML driver library: fall back to CUDA
        log.debug("NVML unavailable (%s); memory figures come from cudaMemGetInfo", exc)
        _nvml_failed = True
        return None
    return used, total
