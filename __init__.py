"""comfy-mesh: run a diffusion transformer split across GPUs.

The first blocks run where ComfyUI runs; the tail runs on a daemon on another GPU,
with the activations between them compressed on the way. This file is the package
root (`comfy_mesh`) and stays import-light: nothing heavy loads until used.
"""

__version__ = "0.1.0"
