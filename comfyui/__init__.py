"""The ComfyUI adapter: a node that splits a loaded FLUX.2 model to a comfy-mesh daemon.

ComfyUI loads it through the repository root (cloned into `ComfyUI/custom_nodes`) or
through `custom_node/` (the folder to copy there); both re-export what is here:

    from comfy_mesh.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_routes

Importing this package loads neither torch, zmq nor ComfyUI: nodes.py defers the work
(split_model.py, link.py) to the moment a node runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .routes import register_routes

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register_routes"]
