"""The ComfyUI node: MODEL in, MODEL out, with the model's tail on a comfy-mesh daemon.

    Load Diffusion Model -> comfy-mesh: Split FLUX.2 to Peer -> KSampler

Import-light on purpose: ComfyUI imports this at start-up, and it pulls in neither torch
nor zmq nor ComfyUI modules; the work (split_model.py) is imported when the node runs.
INPUT_TYPES and VALIDATE_INPUTS run inside ComfyUI's async web handlers: they never wait
(peer discovery and the codec probe run in background threads; see peers.py).
"""

from __future__ import annotations

from .peers import DEFAULT_ADDRESS, MANUAL, codec_choices, peer_choices, resolve_peer
from .errors import MeshError

MAX_BLOCKS = 256  # widget bound only; the node checks the model's real range when it runs


class SplitFlux2ToPeer:
    """Runs the first blocks of a FLUX.2 model here and the last `n_blocks_remote` on a peer."""

    CATEGORY = "advanced/comfy-mesh"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "split"
    DESCRIPTION = ("Split a FLUX.2 model across GPUs: ComfyUI runs the first blocks, a comfy-mesh daemon on another "
                   "GPU (this machine or the LAN) runs the last n_blocks_remote blocks and the final layer. Their "
                   "weights leave this GPU. The daemon must serve the same checkpoint file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "a FLUX.2 model (dev, Klein) from Load Diffusion Model"}),
                "peer": (peer_choices(), {
                    "default": MANUAL,
                    "tooltip": "a daemon found on the network (mDNS), or 'manual address' to use the address below"}),
                "address": ("STRING", {
                    "default": DEFAULT_ADDRESS,
                    "tooltip": "HOST:PORT of the daemon, used when peer is 'manual address' "
                               "(start one with: comfy-mesh daemon --model <file> --host 0.0.0.0)"}),
                "n_blocks_remote": ("INT", {
                    "default": 8, "min": 0, "max": MAX_BLOCKS,
                    "tooltip": "blocks the peer runs, counted from the end (FLUX.2 dev has 56: 8 double + 48 single; "
                               "Klein 9B 32; Klein 4B 25). 0 runs everything here. Their weights leave this GPU."}),
                "codec": (codec_choices(), {
                    "default": "auto",
                    "tooltip": "how the hidden state crosses: auto = raw on this machine, over a network the best "
                               "codec this side encodes and the peer decodes (nvenc, gpu, cpu)"}),
                "quality": ("FLOAT", {
                    "default": 7.0, "min": 0.5, "max": 64.0, "step": 0.5,
                    "tooltip": "lossy codecs: quantisation levels per robust standard deviation (higher: closer, "
                               "more bytes); the gpu codec targets relative error 1 / (quality * sqrt 12), "
                               "0.041 at 7"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, peer, codec):
        # Discovered peers come and go: a saved workflow's peer need not be in today's list.
        try:
            if peer != MANUAL:
                resolve_peer(peer, DEFAULT_ADDRESS)
        except MeshError as exc:
            return str(exc)
        choices = codec_choices()
        if codec not in choices:
            return f"codec {codec!r} is not available in this install; choose one of {', '.join(choices)}"
        return True

    def split(self, model, peer, address, n_blocks_remote, codec, quality, unique_id=None):
        from .split_model import make_split

        key = str(unique_id) if unique_id is not None else "comfy-mesh"
        return (make_split(model, peer=peer, address=address, n_blocks_remote=n_blocks_remote, codec=codec,
                           quality=quality, key=key),)


NODE_CLASS_MAPPINGS = {"ComfyMeshSplitFlux2": SplitFlux2ToPeer}
NODE_DISPLAY_NAME_MAPPINGS = {"ComfyMeshSplitFlux2": "Split FLUX.2 to Peer (comfy-mesh)"}
