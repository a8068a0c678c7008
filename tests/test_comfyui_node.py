"""The ComfyUI node without ComfyUI: its inputs, exports, import lightness, errors, peers,
workflows, and its peer link against a real daemon on loopback.

test_comfyui_integration.py runs the node inside a real ComfyUI when one is available.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import socket
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from comfy_mesh.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, errors, peers, status
from comfy_mesh.comfyui.errors import MeshError
from comfy_mesh.comfyui.nodes import SplitFlux2ToPeer

from conftest import TINY, TINY_GUIDED
from daemon_helpers import running_daemon

REPO = pathlib.Path(__file__).resolve().parent.parent
NODE_TYPE = "ComfyMeshSplitFlux2"
HEAVY = ("torch", "zmq", "comfy", "zeroconf", "numpy", "safetensors", "server", "nodes", "folder_paths")


@pytest.fixture(autouse=True, scope="module")
def no_real_discovery():
    """The node's dropdown would browse mDNS on every interface; tests never touch the real network."""
    peers.DISCOVERY.set_source(_FakeSource([]))
    yield
    peers.DISCOVERY.set_source(None)


# ------------------------------------------------------------------ exports and inputs


def test_mappings_export_the_node():
    assert NODE_CLASS_MAPPINGS == {NODE_TYPE: SplitFlux2ToPeer}
    assert NODE_DISPLAY_NAME_MAPPINGS[NODE_TYPE].startswith("Split FLUX.2 to Peer")


def test_node_input_spec():
    spec = SplitFlux2ToPeer.INPUT_TYPES()
    required = spec["required"]
    assert list(required) == ["model", "peer", "address", "n_blocks_remote", "codec", "quality"]
    assert required["model"][0] == "MODEL"
    assert required["peer"][0][0] == peers.MANUAL and required["peer"][1]["default"] == peers.MANUAL
    assert required["address"][0] == "STRING" and required["address"][1]["default"] == "127.0.0.1:5599"
    n = required["n_blocks_remote"]
    assert n[0] == "INT" and n[1]["min"] == 0 and n[1]["max"] >= 56  # FLUX.2 dev's 8 + 48 blocks fit
    from comfy_mesh import codec as codecs

    # Every registered codec while the probe runs in the background; the usable ones after.
    assert required["codec"][0] in (["auto"] + list(peers.KNOWN_CODECS), ["auto"] + codecs.available())
    assert required["codec"][1]["default"] == "auto"
    assert peers.CODECS.available(wait_s=60) == codecs.available()
    assert SplitFlux2ToPeer.INPUT_TYPES()["required"]["codec"][0] == ["auto"] + codecs.available()
    assert set(peers.KNOWN_CODECS) == set(codecs.capabilities())  # the fallback list names every registered codec
    assert required["quality"][0] == "FLOAT"
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert SplitFlux2ToPeer.RETURN_TYPES == ("MODEL",)
    assert callable(getattr(SplitFlux2ToPeer, SplitFlux2ToPeer.FUNCTION))


def test_validate_inputs_accepts_vanished_peers_and_refuses_garbage():
    v = SplitFlux2ToPeer.VALIDATE_INPUTS
    assert v(peers.MANUAL, "auto") is True
    assert v("studio-pc (192.168.1.20:5599)", "raw") is True  # not discovered right now: still valid
    assert v("10.0.0.5:6000", "auto") is True  # an address saved in the dropdown
    assert "bad peer address" in v("studio-pc (nowhere:99999)", "auto")
    assert "not available" in v(peers.MANUAL, "telepathy")


# ------------------------------------------------------------------ import lightness


LOADER_STYLE = """
import importlib.util, json, sys
path, name = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location(name, path)   # what ComfyUI's load_custom_node does
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[3].split(",")))
print(json.dumps({"mappings": sorted(module.NODE_CLASS_MAPPINGS), "heavy": heavy}))
"""


@pytest.mark.parametrize("entry", ["__init__.py", "custom_node/__init__.py"])
def test_comfyui_loader_imports_nothing_heavy(entry, tmp_path):
    """The repository cloned into custom_nodes, or the copied custom_node/ folder."""
    name = str(tmp_path / "custom_nodes" / "comfy-mesh")  # ComfyUI names the module after the folder's path
    out = subprocess.run([sys.executable, "-c", LOADER_STYLE, str(REPO / entry), name, ",".join(HEAVY)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"mappings": [NODE_TYPE], "heavy": []}


def test_package_import_stays_plain():
    code = ("import sys, json, comfy_mesh, comfy_mesh.comfyui; "
            "print(json.dumps([hasattr(comfy_mesh, 'NODE_CLASS_MAPPINGS'), "
            f"sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, []]


def test_loader_says_how_to_install_when_the_package_is_missing(tmp_path):
    """custom_node/ copied into a ComfyUI whose Python lacks the package."""
    code = textwrap.dedent(f"""
        import builtins, importlib.util, sys
        real_import = builtins.__import__
        def fake(name, *a, **k):
            if name.startswith("comfy_mesh"):
                raise ImportError("No module named 'comfy_mesh'")
            return real_import(name, *a, **k)
        builtins.__import__ = fake
        spec = importlib.util.spec_from_file_location("x", {str(REPO / "custom_node" / "__init__.py")!r})
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "-m pip install" in out.stdout and "restart ComfyUI" in out.stdout


# ------------------------------------------------------------------ errors


def _refused(code: str, message: str = "something"):
    from comfy_mesh.daemon.client import PeerRefused
    from comfy_mesh.daemon.protocol import ErrorReply

    return PeerRefused("tcp://10.0.0.2:5599", ErrorReply(code, message))


def test_error_codes_match_the_protocol():
    from comfy_mesh.daemon.protocol import ErrorCode

    for name in ("FINGERPRINT", "OOM", "VERSION", "TOO_LARGE", "NOT_HOSTING", "BAD_REQUEST", "INTERNAL", "MALFORMED"):
        assert getattr(errors, name) == getattr(ErrorCode, name)


@pytest.mark.parametrize("code, words", [
    ("out_of_memory", ["ran out of GPU memory", "Lower n_blocks_remote"]),
    ("fingerprint", ["model mismatch"]),
    ("version", ["same comfy-mesh version"]),
    ("too_large", ["compressing codec", "--max-message-mb"]),
    ("not_hosting", ["hosts no blocks"]),
    ("internal", ["daemon's log"]),
    ("bad_request", ["refused a request"]),
])
def test_refusals_become_advice(code, words):
    err = errors.explain(_refused(code), "studio (10.0.0.2:5599)", 12)
    assert isinstance(err, MeshError)
    text = str(err)
    assert "studio (10.0.0.2:5599)" in text and "something" in text
    for word in words:
        assert word in text


def test_timeout_becomes_unreachable_advice():
    from comfy_mesh.daemon.client import PeerTimeout

    text = str(errors.explain(PeerTimeout("no answer"), "10.0.0.2:5599"))
    assert "unreachable" in text and "comfy-mesh daemon --model" in text and "firewall" in text


# ------------------------------------------------------------------ peers, addresses, codecs


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:5599", ("127.0.0.1", 5599)), ("tcp://10.1.2.3:6000", ("10.1.2.3", 6000)),
    ("studio.local", ("studio.local", 5599)), ("[::1]:7000", ("::1", 7000)), (" host:1 ", ("host", 1)),
])
def test_parse_address(text, expected):
    assert peers.parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "host:0", "host:70000", "host:port", "::1:5599", "[::1"])
def test_parse_address_refuses(text):
    with pytest.raises(MeshError):
        peers.parse_address(text)


def test_resolve_peer():
    assert peers.resolve_peer(peers.MANUAL, "10.0.0.9:6000") == ("10.0.0.9:6000", "10.0.0.9", "tcp://10.0.0.9:6000")
    assert peers.resolve_peer("studio (192.168.1.20:5599)", "ignored") == (
        "studio (192.168.1.20:5599)", "192.168.1.20", "tcp://192.168.1.20:5599")
    assert peers.resolve_peer("box ([fe80::1]:5599)", "")[2] == "tcp://[fe80::1]:5599"


def _hello_info(decoders, encoders=None, device="cuda:0"):
    """The fields of a daemon's HELLO reply that the codec choice reads."""
    return types.SimpleNamespace(codecs=["cpu", "gpu", "raw"], encoders=encoders or ["cpu", "gpu", "raw"],
                                 decoders=decoders, device=device)


def test_auto_codec_is_negotiated_with_the_peers_hello(monkeypatch):
    from comfy_mesh.codec import negotiate

    # This end encodes nvenc (a card with NVENC); what the daemon decodes decides.
    monkeypatch.setattr(negotiate, "local_capabilities",
                        lambda: (["cpu", "gpu", "nvenc", "raw"], ["cpu", "gpu", "nvenc", "raw"]))
    lan = "tcp://192.168.1.20:5599"
    all_of_them = _hello_info(["cpu", "gpu", "nvenc", "raw", "x265"])
    assert peers.choose_codec("auto", "tcp://127.0.0.1:5599", all_of_them, local_cuda=True)[0] == "raw"
    assert peers.choose_codec("auto", "tcp://localhost:5599", all_of_them, local_cuda=True)[0] == "raw"
    assert peers.choose_codec("auto", lan, all_of_them, local_cuda=True)[0] == "nvenc"
    no_nvdec = _hello_info(["cpu", "gpu", "raw"])  # never nvenc for a daemon that cannot decode it
    assert peers.choose_codec("auto", lan, no_nvdec, local_cuda=True)[0] == "gpu"
    assert peers.choose_codec("auto", lan, no_nvdec, local_cuda=False)[0] == "cpu"
    codec, why = peers.choose_codec("auto", lan, _hello_info(["raw"]), local_cuda=True)
    assert codec == "raw" and "no compressing codec" in why and "reply" not in why
    older = types.SimpleNamespace(codecs=["cpu", "raw"], encoders=None, decoders=None, device="cpu")
    assert peers.choose_codec("auto", lan, older, local_cuda=True)[0] == "cpu"  # a daemon without encoders/decoders
    assert peers.choose_codec("raw", lan, all_of_them, local_cuda=True) == ("raw", "chosen on the node")
    with pytest.raises(MeshError, match="not available"):
        peers.choose_codec("telepathy", lan, all_of_them, local_cuda=False)
    # a daemon of another comfy-mesh version whose gpu messages are another format
    from comfy_mesh.codec import formats

    other = _hello_info(["cpu", "gpu", "raw"])
    other.formats = {**formats(), "gpu": formats()["gpu"] + 1}
    codec, why = peers.choose_codec("auto", lan, other, local_cuda=True)
    assert codec == "cpu" and "gpu not used" in why and "reply" not in why
    with pytest.raises(MeshError, match="same comfy-mesh version"):
        peers.choose_codec("gpu", lan, other, local_cuda=True)
    with pytest.raises(MeshError, match="not available"):
        peers.check_codec("telepathy")


def test_node_quality_tunes_every_lossy_codec():
    import math

    from comfy_mesh.comfyui.link import make_codec, quality_rel_err

    assert make_codec("cpu", 3.0).settings.quality == 3.0
    assert make_codec("gpu", 7.0).settings.rel_err == pytest.approx(1 / (7 * math.sqrt(12)))  # 0.041
    assert make_codec("gpu", 64.0).settings.rel_err < make_codec("gpu", 7.0).settings.rel_err
    assert 0 < quality_rel_err(0.5) < 1  # the whole widget range is a valid gpu setting
    assert make_codec("raw", 7.0).name == "raw"


@dataclasses.dataclass
class _Record:
    name: str
    port: int
    address: str

    def to_json(self):
        return {"name": self.name, "port": self.port, "address": self.address}


class _FakeSource:
    def __init__(self, records):
        self.records, self.started, self.stopped = records, False, False

    def start(self):
        self.started = True
        return self

    def stop(self):
        self.stopped = True

    def peers(self):
        return list(self.records)


def test_dropdown_lists_discovered_peers():
    source = _FakeSource([_Record("studio", 5599, "192.168.1.20"), _Record("attic", 6000, "192.168.1.30")])
    peers.DISCOVERY.set_source(source)
    try:
        assert peers.peer_choices() == [peers.MANUAL, "attic (192.168.1.30:6000)", "studio (192.168.1.20:5599)"]
        assert SplitFlux2ToPeer.INPUT_TYPES()["required"]["peer"][0][1] == "attic (192.168.1.30:6000)"
        from comfy_mesh.comfyui.routes import status_json

        listed = status_json()["peers"]
        assert {p["label"] for p in listed} == {"attic (192.168.1.30:6000)", "studio (192.168.1.20:5599)"}
    finally:
        peers.DISCOVERY.set_source(_FakeSource([]))
    assert source.stopped


def test_discovery_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("COMFY_MESH_DISCOVERY", "0")
    peers.DISCOVERY.stop()  # the next use starts it anew, reading the environment
    try:
        assert peers.peer_choices() == [peers.MANUAL]
        assert "COMFY_MESH_DISCOVERY" in peers.DISCOVERY.error
    finally:
        peers.DISCOVERY.set_source(_FakeSource([]))


def test_input_types_never_wait_for_discovery_or_the_codec_probe(monkeypatch):
    """ComfyUI calls INPUT_TYPES inside its async /object_info handler: a wait there stalls its server."""
    import threading
    import time

    import comfy_mesh.codec
    import comfy_mesh.discovery

    release = threading.Event()
    slow = _FakeSource([_Record("studio", 5599, "192.168.1.20")])

    def slow_peer_source(**kwargs):  # zeroconf starting and a first browse that takes its time
        release.wait(10)
        return slow

    real_available = comfy_mesh.codec.available

    def slow_available():  # an NVENC probe
        release.wait(10)
        return real_available()

    monkeypatch.setenv("COMFY_MESH_DISCOVERY", "1")
    monkeypatch.setattr(comfy_mesh.discovery, "peer_source", slow_peer_source)
    monkeypatch.setattr(comfy_mesh.codec, "available", slow_available)
    monkeypatch.setattr(peers, "CODECS", peers._CodecProbe())
    peers.DISCOVERY.stop()
    try:
        t0 = time.monotonic()
        required = SplitFlux2ToPeer.INPUT_TYPES()["required"]
        assert SplitFlux2ToPeer.VALIDATE_INPUTS(peers.MANUAL, "cpu") is True
        assert time.monotonic() - t0 < 0.5
        assert required["peer"][0] == [peers.MANUAL]  # the manual address works at once
        assert required["codec"][0] == ["auto"] + list(peers.KNOWN_CODECS)
        release.set()
        assert [r.name for r in peers.DISCOVERY.peers(wait_s=10)] == ["studio"]
        assert peers.CODECS.available(wait_s=10) == real_available()
        required = SplitFlux2ToPeer.INPUT_TYPES()["required"]
        assert required["peer"][0] == [peers.MANUAL, "studio (192.168.1.20:5599)"]
        assert required["codec"][0] == ["auto"] + real_available()
    finally:
        release.set()
        peers.DISCOVERY.set_source(_FakeSource([]))
    assert slow.started and slow.stopped


# ------------------------------------------------------------------ status on the node and the route


def test_status_board_shows_on_the_node_through_comfyui(monkeypatch):
    sent = []
    fake_server = types.ModuleType("server")
    fake_server.PromptServer = types.SimpleNamespace(
        instance=types.SimpleNamespace(send_progress_text=lambda text, node: sent.append((node, text))))
    monkeypatch.setitem(sys.modules, "server", fake_server)
    board = status.StatusBoard()
    board.open("17", "studio (10.0.0.2:5599)", "tcp://10.0.0.2:5599")
    board.update("17", state=status.CONNECTED, peer_name="studio", n_blocks=32, n_blocks_remote=16, epoch=3)
    assert sent[-1][0] == "17"
    assert "connected to studio (10.0.0.2:5599)" in sent[-1][1] and "16/32 blocks remote" in sent[-1][1]
    board.update("17", state=status.ERROR, message="comfy-mesh: peer studio is unreachable")
    assert "error" in sent[-1][1] and "unreachable" in sent[-1][1]
    assert board.snapshot()[0]["state"] == "error"


def test_status_route_registers_with_comfyui_server(monkeypatch):
    web = pytest.importorskip("aiohttp.web")
    from comfy_mesh.comfyui import routes

    monkeypatch.setattr(routes, "_registered", False)
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert routes.register_routes() is False  # outside ComfyUI: nothing to do
    table = web.RouteTableDef()
    fake_server = types.ModuleType("server")
    fake_server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(routes=table))
    monkeypatch.setitem(sys.modules, "server", fake_server)
    assert routes.register_routes() is True
    assert [(r.method, r.path) for r in table] == [("GET", "/comfy-mesh/status")]
    data = routes.status_json()
    assert set(data) == {"version", "peers", "discovery", "links"}


# ------------------------------------------------------------------ workflows

WORKFLOWS = {"flux2-klein-9b-split.json": 8 + 24, "flux2-dev-split.json": 8 + 48}  # the models' real block counts
LINK_TYPES = ("MODEL", "CLIP", "CONDITIONING", "GUIDER", "NOISE", "SAMPLER", "SIGMAS", "LATENT", "VAE", "IMAGE")


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_is_consistent(name):
    wf = json.loads((REPO / "workflows" / name).read_text())
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in (out["links"] or []) and inp["link"] == link_id
        assert out["type"] == inp["type"] == kind and kind in LINK_TYPES
    for node in wf["nodes"]:  # every required socket of the graph is fed
        for inp in node.get("inputs", []):
            assert inp["link"] is not None, (node["type"], inp["name"])

    (split,) = [n for n in wf["nodes"] if n["type"] == NODE_TYPE]
    assert split["type"] in NODE_CLASS_MAPPINGS
    spec = SplitFlux2ToPeer.INPUT_TYPES()["required"]
    sockets = [k for k, v in spec.items() if v[0] == "MODEL"]
    widgets = [k for k in spec if k not in sockets]
    assert [i["name"] for i in split["inputs"]] == sockets and [o["type"] for o in split["outputs"]] == ["MODEL"]
    values = dict(zip(widgets, split["widgets_values"], strict=True))
    assert values["peer"] in spec["peer"][0] and SplitFlux2ToPeer.VALIDATE_INPUTS(values["peer"], values["codec"])
    peers.parse_address(values["address"])
    assert 0 < values["n_blocks_remote"] <= WORKFLOWS[name]
    assert values["codec"] in spec["codec"][0]
    assert spec["quality"][1]["min"] <= values["quality"] <= spec["quality"][1]["max"]
    # Load Diffusion Model -> our node -> the sampler's guider
    feeder = nodes[wf["links"][[link[0] for link in wf["links"]].index(split["inputs"][0]["link"])][1]]
    assert feeder["type"] == "UNETLoader"
    takers = [nodes[link[3]] for link in wf["links"] if link[1] == split["id"]]
    assert [t["type"] for t in takers] in (["CFGGuider"], ["BasicGuider"], ["KSampler"])


# ------------------------------------------------------------------ the peer link, against a real daemon


def _params(config):
    """ComfyUI's FluxParams for a comfy-mesh config (the fields the node reads)."""
    return types.SimpleNamespace(hidden_size=config.hidden_size, depth=config.depth_double,
                                 depth_single_blocks=config.depth_single, in_channels=config.in_channels,
                                 out_channels=config.out_channels, context_in_dim=config.context_dim,
                                 guidance_embed=config.guidance_embed, patch_size=1)


def _link(server_endpoint, checkpoint, config, n_remote, key="t", path=None, **settings):
    from comfy_mesh.comfyui.link import LinkSettings, PeerLink, identity_of

    identity = identity_of(_params(config), checkpoint if path is None else path)
    return PeerLink(LinkSettings(key=key, peer="test", endpoint=server_endpoint, n_blocks_remote=n_remote,
                                 **settings), identity, board=status.StatusBoard())


def test_link_installs_a_tail_split_and_reports_connected(tiny_checkpoint):
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 3).connect()
        try:
            assert link.split == 2 and link.n_blocks_remote == 3
            assert server.host.hosted.to_list() == [2, 5] and server.host.is_last
            state = link.board.get("t")
            assert state.state == status.CONNECTED and state.peer_name == "test-node-b" and state.n_blocks_remote == 3
        finally:
            link.close()


def test_link_output_equals_the_local_tail(tiny_checkpoint):
    from comfy_mesh.splitter.model_file import open_model
    from comfy_mesh.splitter.plan import BlockRange
    from daemon_helpers import inputs

    model = open_model(tiny_checkpoint)
    x = inputs(model.config, batch=2)
    whole = model.stage(BlockRange(0, 5), first=True, last=True)
    ctx = whole.context(torch.tensor([0.7, 0.7]), None, x["txt_ids"], x["img_ids"])
    hidden = whole.embed(x["img"], x["txt"])  # the hidden state before block 0: all 5 blocks remote
    expected = whole.finish(whole.run_blocks(hidden, ctx), ctx)
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 5).connect()
        try:
            link.begin_run()
            got = link.forward(hidden, timestep=torch.tensor([0.7, 0.7]), guidance=None, txt_ids=x["txt_ids"],
                               img_ids=x["img_ids"])
        finally:
            link.close()
            model.close()
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    assert link.records[-1].batch == 2 and link.records[-1].rel_err_bound == 0.0


def test_fingerprint_mismatch_names_both_files(tiny_checkpoint, tiny_guided_checkpoint):
    with running_daemon(tiny_guided_checkpoint, blocks=0) as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 2)
        with pytest.raises(MeshError) as info:
            link.connect()
        state = link.board.get("t")
        link.close()
    text = str(info.value)
    assert "tiny-flux2.safetensors" in text and "tiny-flux2-guided.safetensors" in text
    assert "comfy-mesh daemon --model" in text
    assert state.state == status.ERROR and "model mismatch" in state.message


def test_without_a_file_the_sizes_are_still_checked(tiny_checkpoint, tiny_guided_checkpoint):
    with running_daemon(tiny_guided_checkpoint, blocks=0) as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 2, path=None)
        link.identity.path = link.identity.fingerprint = None  # a model ComfyUI built from no known file
        with pytest.raises(MeshError, match="guidance_embed False here vs True there"):
            link.connect()
        link.close()
        ok = _link(server.endpoint, tiny_guided_checkpoint, TINY_GUIDED, 2)
        ok.identity.fingerprint = None
        ok.connect()
        assert any("only the model sizes were checked" in w for w in ok.warnings)
        ok.close()


def test_n_blocks_remote_outside_the_models_range_is_refused(tiny_checkpoint):
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 6)
        with pytest.raises(MeshError, match=r"must be in \[0, 5\]"):
            link.connect()
        link.close()


def test_unreachable_peer_says_so_quickly(tiny_checkpoint):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = _link(f"tcp://127.0.0.1:{port}", tiny_checkpoint, TINY, 2, connect_timeout_s=0.5)
    with pytest.raises(MeshError, match="unreachable"):
        link.connect()
    link.close()


def test_bad_address_says_so_and_leaves_no_socket(tiny_checkpoint, monkeypatch):
    from comfy_mesh.comfyui import link as link_module

    made = []

    class Recording(link_module.DaemonClient):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(link_module, "DaemonClient", Recording)
    link = _link("tcp://bad host:5599", tiny_checkpoint, TINY, 2)
    with pytest.raises(MeshError, match="bad address") as info:
        link.connect()
    assert "HOST:PORT" in str(info.value)
    state = link.board.get("t")
    assert state.state == status.ERROR and "bad address" in state.message
    import zmq

    class RawZmq:  # a client that lets ZeroMQ's own error through
        def __init__(self, *args, **kwargs):
            raise zmq.ZMQError(22, "Invalid argument")

    monkeypatch.setattr(link_module, "DaemonClient", RawZmq)
    with pytest.raises(MeshError, match="bad address"):
        _link("tcp://bad host:5599", tiny_checkpoint, TINY, 2).connect()
    monkeypatch.setattr(link_module, "DaemonClient", Recording)

    with socket.socket() as s:  # nobody listens: the socket the failed connect opened is closed again
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = _link(f"tcp://127.0.0.1:{port}", tiny_checkpoint, TINY, 2, connect_timeout_s=0.3)
    with pytest.raises(MeshError, match="unreachable"):
        link.connect()
    assert link._client is None and made[-1]._sock.closed
    assert link.board.get("t").state == status.ERROR  # the error stays visible


def test_auto_codec_on_loopback_is_raw_after_hello(tiny_checkpoint):
    with running_daemon(tiny_checkpoint, blocks=0) as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 2, codec="auto", local_cuda=True).connect()
        try:
            assert link._codec.name == "raw" and "loopback" in link.codec_reason
            assert link.board.get("t").codec == "raw"
        finally:
            link.close()


@pytest.mark.parametrize("refusal", ["stale_epoch", "not_hosting"])
def test_failed_recovery_during_a_step_gives_advice(tiny_checkpoint, refusal):
    """The daemon refuses a FORWARD, and talking to it again to recover fails too."""
    from comfy_mesh.daemon.client import PeerRefused, PeerTimeout
    from comfy_mesh.daemon.protocol import ErrorReply
    from comfy_mesh.splitter.flux2.stage import image_ids, text_ids

    with running_daemon(tiny_checkpoint, blocks=0) as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 2).connect()
        try:
            link.begin_run()
            old_plan = dict(link.plan.to_dict(), epoch=0)  # older than ours: looks like a restarted daemon
            reply = ErrorReply(refusal, "refused", plan=old_plan if refusal == "stale_epoch" else None)

            def refuse(*args, **kwargs):
                raise PeerRefused(server.endpoint, reply)

            def gone(*args, **kwargs):
                raise PeerTimeout("no answer")

            link._remote.forward = refuse
            link._client.hello = gone  # the stale path says HELLO again
            link._remote.reconfigure = gone  # the not-hosting path re-installs the plan
            with pytest.raises(MeshError, match="unreachable"):
                link.forward(torch.randn(1, 8 + 36, 256), timestep=torch.tensor([0.5]), guidance=None,
                             txt_ids=text_ids(1, 8), img_ids=image_ids(1, 6, 6))
            state = link.board.get("t")
            assert state.state == status.ERROR and "unreachable" in state.message
        finally:
            link.close()


def test_all_local_plan_follows_the_daemon_moving_back_up(tiny_checkpoint, caplog):
    """n_blocks_remote 0: no FORWARD goes out, so the link asks the daemon's plan before a step."""
    from comfy_mesh.comfyui import link as link_module
    from comfy_mesh.daemon.client import DaemonClient
    from comfy_mesh.splitter.flux2.stage import image_ids, text_ids
    from comfy_mesh.splitter.plan import tail_split

    with running_daemon(tiny_checkpoint, blocks=0, node_id="node-z") as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 0).connect()
        try:
            link.begin_run()
            assert link.n_blocks_remote == 0 and link.poll_plan() is False  # nothing moved
            with DaemonClient(server.endpoint, timeout_s=30) as panel:
                panel.reconfigure(tail_split(5, 3, remote="node-z", epoch=link.plan.epoch + 1))
            assert link.poll_plan() is True and link.n_blocks_remote == 3
            out = link.forward(torch.randn(1, 8 + 36, 256), timestep=torch.tensor([0.5]), guidance=None,
                               txt_ids=text_ids(1, 8), img_ids=image_ids(1, 6, 6))
            assert out.shape == (1, 36, 128) and link.records[-1].n_blocks_remote == 3
            with DaemonClient(server.endpoint, timeout_s=30) as panel:  # and back to all local
                panel.reconfigure(tail_split(5, 0, remote="node-z", epoch=link.plan.epoch + 1))
            with pytest.raises(link_module.PlanMoved):
                link.forward(torch.randn(1, 8 + 36, 256), timestep=torch.tensor([0.5]), guidance=None,
                             txt_ids=text_ids(1, 8), img_ids=image_ids(1, 6, 6))
            assert link.n_blocks_remote == 0
        finally:
            endpoint = server.endpoint
    # The daemon is gone: the step goes on all local, said once, and is not held up again.
    try:
        with caplog.at_level("WARNING", logger="comfy_mesh.comfyui.link"):
            assert link.poll_plan() is False
            import time

            t0 = time.monotonic()
            assert link.poll_plan() is False
            assert time.monotonic() - t0 < 0.1
        assert sum("cannot ask" in r.getMessage() for r in caplog.records) == 1
        assert link.n_blocks_remote == 0 and endpoint
    finally:
        link.close()


def test_plan_moved_on_the_daemon_is_adopted_at_the_next_step(tiny_checkpoint):
    from comfy_mesh.comfyui.link import PlanMoved
    from comfy_mesh.daemon.client import DaemonClient
    from comfy_mesh.splitter.plan import tail_split

    with running_daemon(tiny_checkpoint, blocks=0, node_id="node-p") as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 2).connect()
        try:
            with DaemonClient(server.endpoint, timeout_s=30) as panel:  # the panel moves the split
                panel.reconfigure(tail_split(5, 4, remote="node-p", epoch=link.plan.epoch + 1))
            hidden = torch.randn(1, 8 + 36, 256)
            from comfy_mesh.splitter.flux2.stage import image_ids, text_ids

            with pytest.raises(PlanMoved):
                link.forward(hidden, timestep=torch.tensor([0.5]), guidance=None, txt_ids=text_ids(1, 8),
                             img_ids=image_ids(1, 6, 6))
            assert link.split == 1 and link.n_blocks_remote == 4
            out = link.forward(hidden, timestep=torch.tensor([0.5]), guidance=None, txt_ids=text_ids(1, 8),
                               img_ids=image_ids(1, 6, 6))
            assert out.shape == (1, 36, 128)
            with DaemonClient(server.endpoint, timeout_s=30) as panel:  # and again, between runs
                panel.reconfigure(tail_split(5, 1, remote="node-p", epoch=link.plan.epoch + 1))
            link.begin_run()
            assert link.n_blocks_remote == 1
        finally:
            link.close()


def test_restarted_daemon_gets_the_plan_again(tiny_checkpoint):
    with running_daemon(tiny_checkpoint, blocks=0, node_id="node-r") as server:
        link = _link(server.endpoint, tiny_checkpoint, TINY, 3).connect()
        endpoint = server.endpoint
    port = int(endpoint.rsplit(":", 1)[1])
    from comfy_mesh.daemon.host import HostSettings, ModelHost
    from comfy_mesh.daemon.server import DaemonServer, ServerSettings
    from comfy_mesh.splitter.model_file import open_model

    model = open_model(tiny_checkpoint)  # the same port, a new node id and epoch 0, hosting nothing
    server = DaemonServer(ModelHost(model, HostSettings(node_id="node-r2", name="restarted")),
                          ServerSettings(bind_host="127.0.0.1", port=port)).start()
    try:
        link.begin_run()
        assert server.host.hosted.to_list() == [2, 5] and link.info.node == "node-r2"
    finally:
        link.close()
        server.stop()
        model.close()


def test_unpatchify_matches_the_token_layout():
    from comfy_mesh.comfyui.split_model import _unpatchify

    b, c, h, w, p = 2, 3, 5, 4, 2
    hp, wp = 3, 2  # 5 x 4 padded to 6 x 4
    tokens = torch.randn(b, hp * wp + 7, c * p * p)  # 7 reference tokens after the image
    x = torch.zeros(b, c, h, w)
    out = _unpatchify(tokens, x, p)
    assert out.shape == (b, c, h, w)
    for i in range(h):
        for j in range(w):
            t = (i // p) * wp + (j // p)
            for ch in range(c):
                assert out[1, ch, i, j] == tokens[1, t, ch * p * p + (i % p) * p + (j % p)]
    flat = _unpatchify(tokens[:, :, :c], torch.zeros(b, c, hp, wp), 1)  # FLUX.2: patch size 1
    assert torch.equal(flat, tokens[:, :hp * wp, :c].reshape(b, hp, wp, c).permute(0, 3, 1, 2))


def test_block_patch_hands_off_at_the_split_and_runs_below_it():
    from comfy_mesh.comfyui.split_model import KEY, AwayBlock, _BlockPatch, _Capture, _HandOff

    capture = _Capture(split=3)
    txt, img = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    ran = []
    original = {"original_block": lambda args: ran.append(args) or {"img": args["img"], "txt": args["txt"]}}
    args = {"img": img, "txt": txt, "transformer_options": {KEY: capture}}
    _BlockPatch("double", 1, 1)(args, original)
    assert len(ran) == 1
    with pytest.raises(_HandOff) as info:
        _BlockPatch("double", 3, 3)(args, original)
    assert torch.equal(info.value.hidden, torch.cat((txt, img), 1))
    with pytest.raises(_HandOff) as info:
        _BlockPatch("single", 0, 4)({"img": img, "transformer_options": {KEY: capture}}, original)
    assert info.value.hidden is img
    _BlockPatch("double", 3, 3)({"img": img, "txt": txt, "transformer_options": {}}, original)  # no split: runs
    assert len(ran) == 2

    real = torch.nn.Linear(8, 8)
    away = AwayBlock("single_blocks.0", real)
    tree = torch.nn.ModuleList([away])
    assert list(tree.parameters()) == [] and away.weight_bytes == 8 * 8 * 4 + 8 * 4
    assert torch.equal(away(img), real(img))
