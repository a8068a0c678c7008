"""The ComfyUI adapter: nodes that split a loaded model to a comfy-mesh daemon."""
