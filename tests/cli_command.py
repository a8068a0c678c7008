"""How the tests run `comfy-mesh` as a user does: the installed console script, or the
module where the script is not on PATH."""

from __future__ import annotations

import shutil
import sys


def comfy_mesh_command() -> list[str]:
    exe = shutil.which("comfy-mesh")
    return [exe] if exe else [sys.executable, "-m", "comfy_mesh.cli"]
