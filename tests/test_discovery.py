"""Discovery: the peer record, real mDNS on loopback, `comfy-mesh peers`, static peers.

mDNS runs for real on 127.0.0.1 (zeroconf works there even without the MULTICAST
flag on `lo`); every test names that interface, so nothing multicasts on the
machine's network. Registration probes the name for about 1.7 s, which sets the pace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from comfy_mesh.daemon.announce import DaemonAnnouncer, announce_plan
from comfy_mesh.daemon.client import DaemonClient
from comfy_mesh.daemon.memory import memory_report
from comfy_mesh.discovery import CombinedPeers, DiscoveryError, PeerRecord, peer_source
from comfy_mesh.discovery.base import PeerEvent
from comfy_mesh.discovery.address import resolve_ipv4
from comfy_mesh.discovery.mdns import MdnsBrowser, make_zeroconf
from comfy_mesh.discovery.record import SERVICE_TYPE, record_from_daemon
from comfy_mesh.discovery.static import StaticPeers, parse_address
from comfy_mesh.splitter.plan import tail_split

from daemon_helpers import running_daemon

LOOPBACK = ["127.0.0.1"]
MDNS_WAIT_S = 10.0  # registration takes about 1.7 s; leave room on a loaded CI machine
# Node ids of announced daemons are unique per run: another test run on this machine shares loopback mDNS.
RUN = uuid.uuid4().hex[:6]
MDNS_NODE, CLI_NODE, BOTH_NODE = f"node-mdns-{RUN}", f"node-cli-{RUN}", f"node-both-{RUN}"


def _record(**changes) -> PeerRecord:
    base = PeerRecord(node="node-a1", name="studio-pc", port=5599, n_blocks=32, blocks=(16, 32), epoch=3,
                      state="serving", model="flux2-klein-9b.safetensors", model_fingerprint="0123456789abcdef",
                      gpus=["NVIDIA GeForce RTX 3080"], memory_kind="cuda", vram_total=10 * 2**30,
                      vram_free=4 * 2**30, encode=["cpu", "raw"], decode=["cpu", "nvenc", "raw"], proto=1,
                      software="0.1.0", key_fingerprint="SHA256:abc", address="192.168.1.20")
    return base.replace(**changes)


# ------------------------------------------------------------------ the record


def test_record_round_trips_through_txt():
    record = _record()
    txt = record.to_txt()
    assert all(isinstance(v, str) and len(f"{k}={v}".encode()) <= 255 for k, v in txt.items())
    wire = {k.encode(): v.encode() for k, v in txt.items()}  # as zeroconf hands them over
    assert PeerRecord.from_txt(wire, address="192.168.1.20") == record
    assert record.codecs == ["cpu", "raw"] and record.vram_used == 6 * 2**30
    assert record.endpoint == "tcp://192.168.1.20:5599"


def test_record_ignores_unknown_keys_and_reads_a_newer_minor_version():
    txt = _record().to_txt() | {"v": "1.7", "shiny": "new", "zz": ""}
    got = PeerRecord.from_txt(txt, address="192.168.1.20")
    assert got.replace(version="1.0") == _record() and got.version == "1.7"
    # An older writer (fewer keys): the optional ones take their defaults.
    old = {k: v for k, v in _record().to_txt().items() if k in ("app", "v", "id", "name", "nb", "port")}
    got = PeerRecord.from_txt(old)
    assert (got.node, got.n_blocks, got.blocks, got.gpus, got.memory_kind) == ("node-a1", 32, None, [], "process")


@pytest.mark.parametrize("change, match", [
    ({"v": "2.0"}, "newer than this build reads"),
    ({"app": "printer"}, "not a comfy-mesh daemon"),
    ({"app": None}, "not a comfy-mesh daemon"),
    ({"v": "one"}, "not MAJOR.MINOR"),
    ({"id": ""}, "lacks 'id'"),
    ({"id": "no spaces allowed"}, "not a valid node id"),
    ({"id": "node-a1\n"}, "not a valid node id"),
    ({"nb": "-3"}, "not a non-negative integer"),
    ({"nb": "²"}, "not a non-negative integer"),
    ({"epoch": "1²"}, "not a non-negative integer"),
    ({"blocks": "20-40"}, "do not fit"),
    ({"blocks": "garbage"}, "not START-END"),
    ({"vf": str(11 * 2**30)}, "exceeds the total"),
    ({"mk": "tpu"}, "memory kind"),
    ({"port": "70000"}, "not a TCP port"),
])
def test_bad_records_raise_discovery_error(change, match):
    txt = _record().to_txt()
    for k, v in change.items():
        if v is None:
            txt.pop(k)
        else:
            txt[k] = v
    with pytest.raises(DiscoveryError, match=match):
        PeerRecord.from_txt(txt)


def test_non_utf8_and_non_table_txt_raise_discovery_error():
    with pytest.raises(DiscoveryError, match="not UTF-8"):
        PeerRecord.from_txt({b"app": b"\xff\xfe"})
    with pytest.raises(DiscoveryError, match="key/value"):
        PeerRecord.from_txt([b"app=comfy-mesh"])


def test_long_free_text_is_clipped_on_a_character_boundary():
    txt = _record(name="é" * 300, gpus=["GPU " * 80]).to_txt()
    assert all(len(f"{k}={v}".encode()) <= 255 for k, v in txt.items())
    assert PeerRecord.from_txt(txt).name == "é" * 100


def test_static_address_parsing():
    assert parse_address("10.8.0.2:5599") == ("10.8.0.2", 5599)
    assert parse_address("[fd00::2]:7000") == ("fd00::2", 7000)
    assert parse_address("gpu-box.lan:5599") == ("gpu-box.lan", 5599)
    assert parse_address("localhost:5599") == ("localhost", 5599)
    for bad in ("10.8.0.2", "10.8.0.2:0", ":5599", "host:port", "fd00::2:5599", "10.8.0.2:²", "10.8.0.2:5²",
                "gpu box:5599", "bad_host!:5599", "300.1.1.1:5599", "a..b:5599"):
        with pytest.raises(DiscoveryError):
            parse_address(bad)


def test_announce_goes_where_the_daemon_listens():
    assert announce_plan("127.0.0.1", None) == (["127.0.0.1"], ["127.0.0.1"])
    assert announce_plan("192.168.1.20", None) == (["192.168.1.20"], ["192.168.1.20"])
    assert announce_plan("0.0.0.0", ["127.0.0.1"]) == (["127.0.0.1"], ["127.0.0.1"])
    interfaces, addresses = announce_plan("0.0.0.0", None)  # every interface, with this machine's addresses
    assert interfaces is None
    assert addresses == ["127.0.0.1"] or (addresses and not any(a.startswith("127.") for a in addresses))


def test_a_bind_host_that_is_not_an_address_resolves_or_says_why(caplog):
    assert announce_plan("localhost", None) == (["127.0.0.1"], ["127.0.0.1"])
    import ifaddr

    lo = next(a.name for a in ifaddr.get_adapters() if any(ip.ip == "127.0.0.1" for ip in a.ips))  # lo, lo0
    assert announce_plan(lo, None) == (["127.0.0.1"], ["127.0.0.1"])  # an interface name, as ZeroMQ takes it
    assert resolve_ipv4("0.0.0.0") == "0.0.0.0" and resolve_ipv4("127.0.0.1") == "127.0.0.1"
    for bad, match in (("gpu box", "not an IPv4 address"), ("::1", "IPv4 only"), ("300.1.1.1", "not an IPv4")):
        with pytest.raises(DiscoveryError, match=match):
            announce_plan(bad, None)
    # On localhost, announcing on another interface draws the loopback warning.
    caplog.set_level(logging.WARNING, logger="comfy_mesh.daemon.announce")
    server = SimpleNamespace(settings=SimpleNamespace(bind_host="localhost"))
    announcer = DaemonAnnouncer(server, interfaces=["192.0.2.7"])
    assert announcer.addresses == ["127.0.0.1"]
    assert "listens on loopback only" in caplog.text


def test_mdns_on_a_name_instead_of_an_address_is_a_discovery_error():
    with pytest.raises(DiscoveryError, match="cannot open mDNS on"):
        make_zeroconf(["lo"])  # zeroconf raises ValueError before it opens a socket


def test_browser_forgets_a_peer_whose_update_is_malformed(caplog):
    """An update whose TXT no longer validates (a Unicode digit) drops the old record, logged once."""
    caplog.set_level(logging.WARNING, logger="comfy_mesh.discovery.mdns")
    txt = _record().to_txt()
    info = SimpleNamespace(properties=txt, port=5599, parsed_addresses=lambda version: ["127.0.0.1"])
    zc = SimpleNamespace(get_service_info=lambda service_type, name, timeout: info)
    browser = MdnsBrowser(interfaces=LOOPBACK)  # not started: _resolve is driven by hand
    name = f"studio-pc [node-a1].{SERVICE_TYPE}"
    browser._resolve(zc, SERVICE_TYPE, name)
    assert [p.node for p in browser.peers()] == ["node-a1"]
    info.properties = txt | {"nb": "²"}
    browser._resolve(zc, SERVICE_TYPE, name)
    browser._resolve(zc, SERVICE_TYPE, name)
    assert browser.peers() == []
    skips = [r for r in caplog.records if "skipping mDNS service" in r.getMessage()]
    assert len(skips) == 1 and not any(r.exc_info for r in caplog.records)
    info.properties = txt  # fixed again: listed again
    browser._resolve(zc, SERVICE_TYPE, name)
    assert [p.node for p in browser.peers()] == ["node-a1"]


def test_static_peer_that_zeromq_refuses_is_a_quiet_peer_error(caplog):
    caplog.set_level(logging.WARNING, logger="comfy_mesh.discovery.static")
    static = StaticPeers([])
    for _ in range(3):
        static._poll("bad host", 5599)  # past parse_address, which refuses it
    warnings = [r for r in caplog.records if r.name == "comfy_mesh.discovery.static"]
    assert len(warnings) == 1 and "cannot connect" in warnings[0].getMessage() and not warnings[0].exc_info


def test_daemon_withdraws_its_announcement_before_its_server_stops(monkeypatch, capsys):
    from comfy_mesh.daemon import announce, main

    order = []

    class FakeServer:
        endpoint, host = "tcp://127.0.0.1:1", SimpleNamespace(hosted=None, settings=SimpleNamespace(node_id="n"))

        def start(self):
            return self

        def stop(self):
            order.append("server stopped")

    class FakeAnnouncer:
        interfaces = ["127.0.0.1"]

        def __init__(self, server, **kwargs):
            pass

        def start(self):
            return self

        def stop(self):
            order.append("announcement withdrawn")

    monkeypatch.setattr(main, "build", lambda args: FakeServer())
    monkeypatch.setattr(announce, "DaemonAnnouncer", FakeAnnouncer)
    previous = signal.signal(signal.SIGTERM, main._interrupt)  # whenever it lands: an interrupt, never a kill
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        args = SimpleNamespace(no_announce=False, announce_interface=None, announce_refresh=5.0)
        assert main.run(args) == 0
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert order == ["announcement withdrawn", "server stopped"]
    assert json.loads(capsys.readouterr().out)["event"] == "ready"


def test_cpu_node_reports_process_memory():
    mem = memory_report("cpu", 123)
    assert mem["kind"] == "process" and mem["gpu"] is None and 0 < mem["used"] < mem["total"]
    assert mem["weights"] == 123


# ------------------------------------------------------------------ real mDNS on loopback


class EventLog:
    """Collects a source's events; `wait_for` blocks (with a deadline) for a matching one."""

    def __init__(self, source):
        self.events: queue.Queue[PeerEvent] = queue.Queue()
        self.seen: list[PeerEvent] = []
        source.on_event(self.events.put)

    def wait_for(self, pred, timeout: float = MDNS_WAIT_S) -> PeerEvent:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = self.events.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise AssertionError(f"no matching event within {timeout} s; saw "
                                     f"{[(e.kind, e.record.node, e.record.blocks) for e in self.seen]}") from None
            self.seen.append(event)
            if pred(event):
                return event


@contextlib.contextmanager
def foreign_services():
    """Services of our type that are not usable comfy-mesh records: a printer, a newer version, garbage."""
    zc = Zeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    records = {
        "printer": {"app": "cups", "rp": "printers/laser"},
        "future": _record(node="node-future").to_txt() | {"v": "9.0"},
        "garbage": {b"app": b"comfy-mesh", b"v": b"1.0", b"id": b"node-x", b"nb": b"\xff\xfe"},
    }
    infos = [ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=9, properties=props,
                         server=f"{name}-host.local.", addresses=[socket.inet_aton("127.0.0.1")])
             for name, props in records.items()]
    threads = [threading.Thread(target=zc.register_service, args=(info,)) for info in infos]
    for t in threads:
        t.start()
    try:
        yield infos
    finally:
        for t in threads:
            t.join(10)
        zc.close()


def test_mdns_daemon_appears_updates_and_disappears(tiny_checkpoint, caplog):
    caplog.set_level(logging.WARNING, logger="comfy_mesh.discovery.mdns")
    browser = MdnsBrowser(interfaces=LOOPBACK)
    log = EventLog(browser)
    browser.start()
    try:
        with foreign_services(), running_daemon(tiny_checkpoint, blocks=2, node_id=MDNS_NODE) as server:
            announcer = DaemonAnnouncer(server, interfaces=LOOPBACK, refresh_s=1.0, check_s=0.1).start()
            try:
                added = log.wait_for(lambda e: e.kind == "add" and e.record.node == MDNS_NODE).record
                assert (added.name, added.address, added.port) == (f"test-{MDNS_NODE}", "127.0.0.1", server.port)
                assert (added.n_blocks, added.blocks, added.epoch, added.state) == (5, (3, 5), 0, "serving")
                assert added.model == "tiny-flux2.safetensors" and added.memory_kind == "process"
                assert 0 < added.vram_free < added.vram_total and added.gpus == []
                assert "raw" in added.codecs and added.proto == 1 and added.software

                with DaemonClient(server.endpoint, timeout_s=10) as client:
                    client.reconfigure(tail_split(5, 4, remote=MDNS_NODE, epoch=1))
                t0 = time.monotonic()
                updated = log.wait_for(lambda e: e.kind == "update" and e.record.node == MDNS_NODE
                                       and e.record.blocks == (1, 5)).record
                assert updated.epoch == 1 and time.monotonic() - t0 < 5.0
            finally:
                announcer.stop()
            removed = log.wait_for(lambda e: e.kind == "remove" and e.record.node == MDNS_NODE)
            assert removed.record.blocks == (1, 5)
        # The three foreign services were seen, logged and skipped; the browser never listed them.
        assert not {p.node for p in browser.peers()} & {MDNS_NODE, "node-future", "node-x"}
        assert not [e for e in log.seen if e.record.node in ("node-future", "node-x")]
        messages = " | ".join(r.getMessage() for r in caplog.records)
        assert "not a comfy-mesh daemon" in messages and "newer than this build reads" in messages
        assert "not UTF-8" in messages
    finally:
        browser.stop()


ANNOUNCE_AND_WAIT = """
import sys, time
from comfy_mesh.discovery.mdns import Announcer
from comfy_mesh.discovery.record import PeerRecord
Announcer(["127.0.0.1"], ttl_s=4).publish(PeerRecord(node=sys.argv[1], name=sys.argv[1], port=9, n_blocks=5),
                                          ["127.0.0.1"])
print("up", flush=True)
time.sleep(120)
"""


def test_a_daemon_that_dies_without_goodbye_leaves_after_its_ttl():
    """SIGKILL sends no goodbye: the browser drops the peer once its records expire; a live one stays."""
    browser = MdnsBrowser(interfaces=LOOPBACK, liveness_s=0.5, resolve_timeout_ms=1000)
    log = EventLog(browser)
    live, dead = f"node-live-{RUN}", f"node-dead-{RUN}"
    procs = {node: subprocess.Popen([sys.executable, "-c", ANNOUNCE_AND_WAIT, node], stdout=subprocess.PIPE,
                                    text=True) for node in (live, dead)}
    browser.start()
    try:
        for proc in procs.values():
            assert proc.stdout.readline().strip() == "up"
        added = set()
        while added != {live, dead}:  # in whichever order they come
            added.add(log.wait_for(lambda e: e.kind == "add" and e.record.node in {live, dead}).record.node)
        procs[dead].kill()
        t0 = time.monotonic()
        log.wait_for(lambda e: e.kind == "remove" and e.record.node == dead, timeout=15)
        assert time.monotonic() - t0 < 4 + 0.5 + 1 + 3  # TTL, one check, one query, slack
        time.sleep(4)  # another TTL: the live one's records were refreshed, it stays
        assert live in {p.node for p in browser.peers()}
    finally:
        browser.stop()
        for proc in procs.values():
            proc.kill()
            proc.wait(10)


def _cli(*args, timeout=60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "comfy_mesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_peers_cli_lists_a_daemon_process(tiny_checkpoint):
    """`comfy-mesh daemon` announces (on loopback); `comfy-mesh peers --json` lists it; SIGTERM withdraws it."""
    daemon = subprocess.Popen([sys.executable, "-m", "comfy_mesh.cli", "daemon", "--model", tiny_checkpoint,
                               "--port", "0", "--blocks", "3", "--name", "cli-daemon", "--node-id", CLI_NODE,
                               "--announce-interface", "127.0.0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(daemon.stdout.readline())
        port = int(ready["endpoint"].rsplit(":", 1)[1])
        assert ready["announce"] == ["127.0.0.1"]
        result = _cli("peers", "--json", "--timeout", "3", "--interface", "127.0.0.1")
        assert result.returncode == 0, result.stderr
        peers = [p for p in json.loads(result.stdout) if p["node"] == CLI_NODE]
        assert len(peers) == 1, result.stdout
        p = peers[0]
        required = {"name", "address", "port", "gpu", "vram_total", "vram_free", "codecs", "model", "blocks",
                    "version"}
        assert required <= set(p)
        assert (p["name"], p["address"], p["port"], p["blocks"]) == ("cli-daemon", "127.0.0.1", port, [2, 5])
        assert p["gpu"] is None and p["memory_kind"] == "process" and 0 < p["vram_free"] < p["vram_total"]
        assert "raw" in p["codecs"] and p["model"] == "tiny-flux2.safetensors" and p["version"]
        assert p["n_blocks"] == 5 and p["source"] == "mdns"
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0 and "withdrew" in err, err[-2000:]


def test_peers_cli_table_and_static_peer_without_mdns(tiny_checkpoint):
    with running_daemon(tiny_checkpoint, blocks=1, node_id="node-static") as server:
        result = _cli("peers", "--no-mdns", "--peer", f"127.0.0.1:{server.port}", "--timeout", "1")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "ADDRESS", "GPU"]
    assert "test-node-static" in row and f"127.0.0.1:{server.port}" in row and "[4, 5) of 5" in row
    assert "process" in row and "serving" in row


def test_static_peers_come_and_go(tiny_checkpoint):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()  # nothing listens there
    with running_daemon(tiny_checkpoint, blocks=2, node_id="node-s") as server:
        static = StaticPeers([f"127.0.0.1:{server.port}", f"127.0.0.1:{dead_port}"], interval_s=0.3, timeout_s=0.5)
        log = EventLog(static)
        with static:
            added = log.wait_for(lambda e: e.kind == "add").record
            assert (added.node, added.address, added.port, added.source) == ("node-s", "127.0.0.1", server.port,
                                                                             "static")
            assert added.blocks == (3, 5) and added.n_blocks == 5 and added.software
            with DaemonClient(server.endpoint, timeout_s=10) as client:
                client.reconfigure(tail_split(5, 1, remote="node-s", epoch=1))
            assert log.wait_for(lambda e: e.kind == "update").record.blocks == (4, 5)
            server.stop()
            assert log.wait_for(lambda e: e.kind == "remove").record.node == "node-s"
            assert static.peers() == []


def test_combined_sources_keep_one_row_per_node(tiny_checkpoint):
    """A daemon found by mDNS and named statically is one peer; it leaves when neither sees it."""
    with running_daemon(tiny_checkpoint, blocks=2, node_id=BOTH_NODE) as server:
        announcer = DaemonAnnouncer(server, interfaces=LOOPBACK, refresh_s=1.0, check_s=0.1).start()
        source = peer_source(interfaces=LOOPBACK, static=[f"127.0.0.1:{server.port}"], static_interval_s=0.3)
        assert isinstance(source, CombinedPeers)
        log = EventLog(source)
        with source:
            log.wait_for(lambda e: e.kind == "add" and e.record.node == BOTH_NODE)
            deadline = time.monotonic() + MDNS_WAIT_S
            while source.sources[0].table.get(BOTH_NODE) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [p.node for p in source.peers() if p.node == BOTH_NODE] == [BOTH_NODE]  # one row, not two
            assert source.table.get(BOTH_NODE).source == "mdns"  # mDNS is listed first, so its record wins
            announcer.stop()  # mDNS forgets it; the static poll still sees it
            deadline = time.monotonic() + MDNS_WAIT_S
            while source.sources[0].table.get(BOTH_NODE) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert source.table.get(BOTH_NODE).source == "static"
            assert not [e for e in log.seen if e.kind == "remove" and e.record.node == BOTH_NODE]


def test_record_from_daemon_replies(tiny_checkpoint):
    with running_daemon(tiny_checkpoint, blocks=2, node_id="node-r") as server, \
            DaemonClient(server.endpoint, timeout_s=10) as client:
        record = record_from_daemon(client.hello(), client.status(), port=server.port, address="127.0.0.1")
    txt_again = PeerRecord.from_txt(record.to_txt(), address="127.0.0.1", source="static")
    assert txt_again == record and record.blocks == (3, 5)


def test_record_of_a_gpu_node_carries_its_vram():
    from types import SimpleNamespace

    hello = SimpleNamespace(node="node-g", name="gpu-box", n_blocks=32, model="/m/klein.safetensors",
                            fingerprint="ab" * 32, codecs=["raw", "nvenc"], proto=1)
    status = SimpleNamespace(hosted=[16, 32], epoch=2, state="serving", model="/m/klein.safetensors",
                             codecs=["raw"], memory={"kind": "cuda", "gpu": "NVIDIA H200", "used": 10 * 2**30,
                                                     "total": 140 * 2**30, "weights": 0})
    record = record_from_daemon(hello, status, port=5599, address="10.0.0.7")
    assert (record.gpus, record.memory_kind, record.vram_total, record.vram_free) == (
        ["NVIDIA H200"], "cuda", 140 * 2**30, 130 * 2**30)
    assert (record.encode, record.decode, record.model) == (["raw"], ["raw", "nvenc"], "klein.safetensors")
    assert record.to_json()["gpu"] == "NVIDIA H200" and record.to_json()["blocks"] == [16, 32]


def test_discovery_needs_some_source():
    with pytest.raises(DiscoveryError, match="--peer"):
        peer_source(mdns=False, static=None)
