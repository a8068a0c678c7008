"""comfy-mesh for ComfyUI: the folder to copy into `ComfyUI/custom_nodes/`.

It holds no code of its own: it exposes the nodes of the `comfy-mesh` package, which
must be installed in ComfyUI's Python (see the README's ComfyUI section):

    <ComfyUI's python> -m pip install comfy-mesh      # or: -m pip install /path/to/comfy-mesh
    cp -r custom_node ComfyUI/custom_nodes/comfy-mesh

Importing it loads neither torch nor zmq; the node's work loads when the node runs.
"""

try:
    from comfy_mesh.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_routes
except ImportError as exc:
    import sys

    raise ImportError(
        f"the comfy-mesh package is not installed in ComfyUI's Python: run `{sys.executable} -m pip install "
        f"<path to the comfy-mesh repository>` and restart ComfyUI ({exc})") from exc

register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
