"""`comfy-mesh bench codec`, run as a user runs it: every codec this machine has, on the
activation corpus, at a small width so it takes seconds."""

import json
import subprocess

import pytest

from comfy_mesh.codec import capabilities
from comfy_mesh.codec.bench import DEFAULT_GRID

from cli_command import comfy_mesh_command


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(comfy_mesh_command() + ["bench", "codec", *args], capture_output=True, text=True,
                          timeout=600)


def test_every_codec_and_quality_is_measured_or_skipped_with_its_reason():
    done = _bench("--channels", "64", "--repeat", "1", "--no-captured", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = report["results"]
    usable = capabilities()
    for name, settings_list in DEFAULT_GRID.items():
        if not usable[name][0]:
            assert {"entry": "all", "codec": name, "skipped": usable[name][1]} in rows
            continue
        for settings in settings_list:
            mine = [r for r in rows if r.get("codec") == name and all(r.get(k) == v for k, v in settings.items())]
            assert {r["entry"] for r in mine} == {"dit-like", "dit-like, no high-norm tokens", "steps rho=0.95",
                                                  "steps rho=0.9"}, (name, settings)
            for r in mine:
                assert r["ratio"] > 0.9 and 0 <= r["rel_l2"] < 0.2 and -1 <= r["worst_channel_cos"] <= 1, r
                assert r["encode_gbps"] > 0 and r["decode_gbps"] > 0, r
                assert r["bytes"] * r["ratio"] == pytest.approx(report["tokens"] * report["channels"] * 2)
    raw = [r for r in rows if r.get("codec") == "raw"]
    assert all(r["rel_l2"] == 0 and 0.95 < r["ratio"] <= 1 for r in raw)
    # the gpu codec's temporal mode: a delta of a step pair is smaller than its key message
    gains = [r["temporal_gain"] for r in rows if r.get("codec") == "gpu" and "temporal_gain" in r]
    assert len(gains) == 6 and min(gains) > 1.2, gains


def test_the_table_names_each_setting_and_unknown_codecs_are_refused():
    done = _bench("--channels", "64", "--repeat", "1", "--no-captured", "--codecs", "gpu,raw")
    assert done.returncode == 0, done.stderr[-3000:]
    for label in ("gpu rel_err=0.02", "gpu rel_err=0.05", "gpu rel_err=0.1", "raw"):
        assert label in done.stdout, done.stdout
    assert "cpu quality" not in done.stdout
    bad = _bench("--codecs", "gpu,nope")
    assert bad.returncode == 2 and "unknown codec nope" in bad.stderr and "Traceback" not in bad.stderr
