"""A real daemon (ROUTER on an ephemeral loopback port) around a tiny checkpoint, for tests;
and a peer source that finds none, to keep tests that do not test discovery off the network."""

from __future__ import annotations

import contextlib

import torch

from comfy_mesh.daemon.host import HostSettings, ModelHost
from comfy_mesh.daemon.server import DaemonServer, ServerSettings
from comfy_mesh.splitter.flux2.stage import image_ids, text_ids
from comfy_mesh.splitter.model_file import open_model


@contextlib.contextmanager
def running_daemon(checkpoint: str, blocks: int = 2, node_id: str = "node-b", max_message_bytes: int = 1 << 30,
                   bind_host: str = "127.0.0.1"):
    model = open_model(checkpoint)
    host = ModelHost(model, HostSettings(node_id=node_id, name=f"test-{node_id}", max_message_bytes=max_message_bytes),
                     n_blocks_hosted=blocks)
    server = DaemonServer(host, ServerSettings(bind_host=bind_host, port=0)).start()
    try:
        yield server
    finally:
        server.stop()
        model.close()


def inputs(config, size=6, n_txt=8, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, size * size, config.in_channels, generator=g),
                txt=torch.randn(batch, n_txt, config.context_dim, generator=g),
                img_ids=image_ids(batch, size, size), txt_ids=text_ids(batch, n_txt),
                guidance=torch.full((batch,), 4.0) if config.guidance_embed else None)


class NoPeers:
    """A peer source (start, stop, peers, on_event) that finds no daemons."""

    def start(self):
        return self

    def stop(self):
        pass

    def peers(self):
        return []

    def on_event(self, listener):
        pass
