"""`GET /comfy-mesh/status`: peers and link states for the ComfyUI frontend (and the panel).

    {"version": "0.1.0",
     "peers": [{"label": "studio-pc (192.168.1.20:5599)", "name": ..., "endpoint": ..., ...}],
     "discovery": null | "why there is no discovery",
     "links": [{"key": "<node id>", "state": "running", "peer_name": ..., "n_blocks_remote": 16, ...}]}

Routes must be added before ComfyUI's web app starts, so `register_routes()` runs when
the custom node is imported; it looks the server up in sys.modules instead of importing
it, so outside ComfyUI it does nothing and imports nothing.
"""

from __future__ import annotations

import logging
import sys

from . import peers, status

log = logging.getLogger(__name__)

STATUS_PATH = "/comfy-mesh/status"
_registered = False


def status_json() -> dict:
    from .. import __version__

    try:
        found = peers.peers_json(wait_s=peers.FIRST_BROWSE_WAIT_S)  # off the event loop (below)
    except Exception as exc:  # discovery trouble must not break the status page
        log.warning("comfy-mesh: listing peers failed: %s", exc)
        found = []
    return {"version": __version__, "peers": found, "discovery": peers.DISCOVERY.error,
            "links": status.BOARD.snapshot()}


def register_routes() -> bool:
    """Add the status route to ComfyUI's PromptServer, if one runs in this process."""
    global _registered
    if _registered:
        return True
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(prompt_server, "routes", None)
    if routes is None:
        return False
    from aiohttp import web  # ComfyUI's own web framework, loaded already

    @routes.get(STATUS_PATH)
    async def comfy_mesh_status(request):
        import asyncio

        # The first call may start discovery and wait for answers: keep it off the event loop.
        data = await asyncio.get_running_loop().run_in_executor(None, status_json)
        return web.json_response(data)

    _registered = True
    return True
