"""comfy-mesh: run a diffusion transformer split across GPUs.

The first blocks run where ComfyUI runs; the tail runs on a daemon on another GPU,
with the activations between them compressed on the way. This file is the package
root (`comfy_mesh`) and stays import-light: nothing heavy loads until used.

It is also what ComfyUI imports when this repository is cloned into
`ComfyUI/custom_nodes/`: ComfyUI loads it under a module name of its own (the folder's
path), and then it exposes the node mappings of the installed `comfy_mesh.comfyui`
package. Imported as `comfy_mesh`, it defines nothing but the version.
"""

__version__ = "0.1.0"

if __name__ != "comfy_mesh":  # loaded by ComfyUI from custom_nodes/, not as the installed package
    try:
        from comfy_mesh.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_routes
    except ImportError as _exc:
        import os as _os
        import sys as _sys

        raise ImportError(
            "comfy-mesh is in custom_nodes but not installed in ComfyUI's Python; run "
            f"`{_sys.executable} -m pip install -e {_os.path.dirname(_os.path.abspath(__file__))}` "
            f"and restart ComfyUI ({_exc})") from _exc
    register_routes()
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
