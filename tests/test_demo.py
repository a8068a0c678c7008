"""`comfy-mesh demo`, run as a user runs it: the console script, a daemon subprocess, JSON out."""

import json
import shutil
import subprocess
import sys

import pytest

FIELDS = {"model", "steps", "n_blocks_remote", "codec", "bytes_per_step", "raw_bytes_per_step", "ratio",
          "hop_rel_err", "final_rel_err", "local_step_s", "split_step_s"}


def _demo(*args):
    exe = shutil.which("comfy-mesh")
    cmd = [exe] if exe else [sys.executable, "-m", "comfy_mesh.cli"]
    done = subprocess.run(cmd + ["demo", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_demo_raw_equals_all_local():
    result = json.loads(_demo("--json", "--codec", "raw", "--steps", "3", "--size", "16"))
    assert FIELDS <= set(result)
    assert result["final_rel_err"] <= 1e-5 and result["hop_rel_err"] == 0.0
    assert result["steps"] == 3 and result["n_blocks_remote"] == 3 and result["codec"] == "raw"
    # float32 carry and output, raw: twice the bf16 bytes, plus headers and the one-time ids.
    assert 0.4 < result["ratio"] < 0.5
    assert result["local_step_s"] > 0 and result["split_step_s"] > 0


def test_demo_cpu_codec_compresses_within_its_error():
    result = json.loads(_demo("--json", "--codec", "cpu", "--steps", "3", "--n-blocks-remote", "4"))
    assert result["ratio"] >= 3.0
    assert 0 < result["hop_rel_err"] <= 0.05
    assert result["final_rel_err"] < 0.1
    assert result["n_blocks_remote"] == 4


def test_demo_table_and_bad_arguments():
    table = _demo("--steps", "2", "--size", "8")
    assert "final latent vs all-local" in table and "ratio" in table
    exe = shutil.which("comfy-mesh")
    cmd = [exe] if exe else [sys.executable, "-m", "comfy_mesh.cli"]
    bad = subprocess.run(cmd + ["demo", "--codec", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown codec 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(cmd + ["demo", "--n-blocks-remote", "9"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "n_blocks_remote must be in [0, 5]" in bad.stderr


def test_daemon_with_a_missing_model_says_so():
    exe = shutil.which("comfy-mesh")
    cmd = [exe] if exe else [sys.executable, "-m", "comfy_mesh.cli"]
    bad = subprocess.run(cmd + ["daemon", "--model", "/nonexistent/flux2.safetensors", "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
