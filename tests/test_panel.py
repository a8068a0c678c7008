"""The control panel, offscreen, against real daemons found over real mDNS on loopback.

The headline: a 20-step generation runs in a background thread while the panel's
slider (driven by the keyboard) moves the split on the daemon; the generation picks
up each new plan at its next step, in both directions, and still equals the
all-local result (raw codec).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before any Qt import: no display needed

import contextlib
import logging
import socket
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import (
    QAbstractButton, QAbstractItemView, QAbstractSlider, QPlainTextEdit, QProgressBar, QWidget,
)
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from comfy_mesh import codec as codecs
from comfy_mesh.daemon.announce import DaemonAnnouncer
from comfy_mesh.daemon.client import DaemonClient
from comfy_mesh.daemon.protocol import StatusReply
from comfy_mesh.daemon.remote_stage import RemoteStage
from comfy_mesh.discovery.mdns import MdnsBrowser
from comfy_mesh.discovery.record import SERVICE_TYPE, PeerRecord
from comfy_mesh.panel import controller as panel_controller
from comfy_mesh.panel.controller import MoveResult, PeerController
from comfy_mesh.panel.peer_model import COLUMNS
from comfy_mesh.panel.plots import StatusSeries
from comfy_mesh.panel.window import MainWindow
from comfy_mesh.splitter.model_file import open_model
from comfy_mesh.splitter.plan import BlockRange, tail_split
from comfy_mesh.splitter.sampling import euler_sample, flow_sigmas
from comfy_mesh.splitter.split_runner import SplitRunner

from daemon_helpers import NoPeers, inputs, running_daemon

LOOPBACK = ["127.0.0.1"]
WAIT_MS = 15_000  # mDNS registration takes about 1.7 s; leave room on a loaded CI machine
# Node ids unique per run: another test run on this machine shares loopback mDNS.
RUN = uuid.uuid4().hex[:6]
P1, P2, GEN = f"node-p1-{RUN}", f"node-p2-{RUN}", f"node-gen-{RUN}"


@contextlib.contextmanager
def announced_daemon(checkpoint: str, node_id: str, blocks: int):
    with running_daemon(checkpoint, blocks=blocks, node_id=node_id) as server:
        announcer = DaemonAnnouncer(server, interfaces=LOOPBACK, refresh_s=1.0, check_s=0.1).start()
        try:
            yield server
        finally:
            announcer.stop()


@contextlib.contextmanager
def garbage_service():
    """A service of our type whose TXT record is not a comfy-mesh record."""
    zc = Zeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    info = ServiceInfo(SERVICE_TYPE, f"garbage.{SERVICE_TYPE}", port=9, properties={b"app": b"\xff", b"v": b"x"},
                       server="garbage-host.local.", addresses=[socket.inet_aton("127.0.0.1")])
    thread = threading.Thread(target=zc.register_service, args=(info,))
    thread.start()
    try:
        yield
    finally:
        thread.join(10)
        zc.close()


def open_window(qtbot, settings_path) -> MainWindow:
    settings = QSettings(str(settings_path), QSettings.Format.IniFormat)
    window = MainWindow(MdnsBrowser(LOOPBACK), settings=settings, poll_s=0.2, description="mDNS on 127.0.0.1")
    qtbot.addWidget(window)
    window.show()
    window.start()
    return window


def cell(window: MainWindow, node: str, column: str) -> str:
    return window.model.index(window.model.row_of(node), COLUMNS.index(column)).data()


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = open_model(tiny_checkpoint)
    yield m
    m.close()


def test_panel_lists_daemons_moves_the_split_remembers_and_shows_errors(qtbot, tiny_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="comfy_mesh.discovery.mdns")
    ini = tmp_path / "panel.ini"
    with garbage_service(), announced_daemon(tiny_checkpoint, P1, 2) as p1, \
            announced_daemon(tiny_checkpoint, P2, 1) as p2:
        window = open_window(qtbot, ini)
        qtbot.waitUntil(lambda: window.model.row_of(P1) is not None and window.model.row_of(P2) is not None,
                        timeout=WAIT_MS)
        assert cell(window, P1, "Name") == f"test-{P1}"
        assert cell(window, P2, "Address") == f"127.0.0.1:{p2.port}"
        assert cell(window, P2, "GPU") == "CPU" and cell(window, P2, "Memory").endswith(" GiB process")
        assert cell(window, P2, "Blocks") == "[4, 5) of 5" and cell(window, P2, "State") == "serving"
        assert "raw" in cell(window, P2, "Codecs")

        # Every control explains itself.
        kinds = (QAbstractSlider, QAbstractButton, QAbstractItemView, QProgressBar, QPlainTextEdit)
        controls = [w for w in window.findChildren(QWidget) if isinstance(w, kinds) and w.isVisibleTo(window)]
        controls += [window.dismiss, window.progress]  # shown only while there is an error / a load
        assert len(controls) >= 6 and all(w.toolTip() for w in controls), [w for w in controls if not w.toolTip()]
        assert all(window.model.headerData(c, Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)
                   for c in range(len(COLUMNS)))
        assert all(w.toolTip() for w in window.plots.findChildren(type(window.plots._plots["ratio"][0])))

        # Select the second peer; the slider takes the model's real range; the keyboard moves it.
        window.select_node(P2)
        qtbot.waitUntil(lambda: window.slider.isEnabled() and window.controller.peer.node == P2,
                        timeout=WAIT_MS)
        assert (window.slider.minimum(), window.slider.maximum(), window.slider.value()) == (0, 5, 1)
        assert window.slider.focusPolicy() == Qt.FocusPolicy.StrongFocus
        window.slider.setFocus()
        qtbot.keyClick(window.slider, Qt.Key.Key_End)  # all five blocks to the daemon
        qtbot.waitUntil(lambda: p2.host.hosted == BlockRange(0, 5) and not window.controller.busy, timeout=WAIT_MS)
        qtbot.waitUntil(lambda: "now hosting [0, 5)" in window.move_status.text(), timeout=WAIT_MS)
        qtbot.waitUntil(lambda: cell(window, P2, "Blocks") == "[0, 5) of 5", timeout=WAIT_MS)  # via mDNS
        assert p1.host.hosted == BlockRange(3, 5)  # the other daemon was left alone
        window.resize(760, 580)  # within the offscreen screen (800 x 600), above the window's minimum
        size = (window.width(), window.height())
        assert size != (1000, 720)
        window.close()  # saves geometry and the last peer

        settings = QSettings(str(ini), QSettings.Format.IniFormat)
        assert settings.value("peers/last") == P2 and settings.value("window/geometry") is not None

        # A new window restores the size and reselects the last peer, though another one is listed first.
        again = open_window(qtbot, ini)
        assert (again.width(), again.height()) == size
        qtbot.waitUntil(lambda: again.controller.info is not None, timeout=WAIT_MS)
        assert again.controller.peer.node == P2 and again.slider.value() == 5

        # The daemon's socket goes away (its announcement stays): the window says so, not only a log.
        p2.stop()
        qtbot.waitUntil(lambda: "no answer" in again.error_text, timeout=WAIT_MS)
        assert f"test-{P2}" in again.error_text and again.banner.isVisible()
        assert cell(again, P2, "State") == "unreachable"
        assert "error: " in again.log_view.toPlainText()
        again.close()
    # The garbage service never became a row; the browser logged it and went on.
    assert "skipping mDNS service 'garbage." in " ".join(r.getMessage() for r in caplog.records)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_slider_moves_a_running_generation_at_its_next_step(qtbot, tiny_checkpoint, model, tmp_path):
    x = inputs(model.config)
    steps, n = 20, model.config.n_blocks
    sigmas = flow_sigmas(steps, shift=3.0)

    def sample(fn):
        return euler_sample(lambda z, s, i: fn(z, x["txt"], s, x["img_ids"], x["txt_ids"], x["guidance"], i),
                            x["img"], sigmas)

    whole = model.stage(BlockRange(0, n), first=True, last=True)
    expected = sample(lambda *a: whole(*a[:-1]))

    with announced_daemon(tiny_checkpoint, GEN, 2) as server:
        window = open_window(qtbot, tmp_path / "panel.ini")
        qtbot.waitUntil(lambda: window.model.row_of(GEN) is not None, timeout=WAIT_MS)
        window.select_node(GEN)
        qtbot.waitUntil(lambda: window.slider.isEnabled() and window.controller.peer.node == GEN, timeout=WAIT_MS)
        assert window.slider.maximum() == n

        client = DaemonClient(server.endpoint, timeout_s=30, name="generation")
        remote = RemoteStage(client, codecs.get("raw"))
        info = remote.connect(fingerprint=model.fingerprint)
        plan = tail_split(n, 2, remote=info.node, epoch=info.epoch + 1)
        runner = SplitRunner(model.stage(plan.local, first=True, last=False), plan, {info.node: remote})

        # The generation pauses at two step boundaries while the panel moves the split.
        moves = {6: 4, 13: 1}  # step -> n_blocks_remote the panel sets before that step runs
        reached = {i: threading.Event() for i in moves}
        go_on = {i: threading.Event() for i in moves}
        result: dict = {}

        def step(z, txt, s, img_ids, txt_ids, guidance, i):
            if i in moves:
                reached[i].set()
                if not go_on[i].wait(30):
                    raise TimeoutError(f"the panel did not move the split before step {i}")
            return runner(z, txt, s, img_ids, txt_ids, guidance)

        def generate():
            try:
                result["out"] = sample(step)
            except BaseException as exc:  # reported by the assertions below
                result["error"] = exc

        thread = threading.Thread(target=generate, name="generation", daemon=True)
        thread.start()
        window.slider.setFocus()
        for i, k in moves.items():
            qtbot.waitUntil(reached[i].is_set, timeout=WAIT_MS)
            key = Qt.Key.Key_Right if k > window.slider.value() else Qt.Key.Key_Left
            for _ in range(abs(k - window.slider.value())):
                qtbot.keyClick(window.slider, key)
            qtbot.waitUntil(lambda k=k: server.host.hosted == BlockRange(n - k, n) and not window.controller.busy,
                            timeout=WAIT_MS)
            go_on[i].set()
        thread.join(60)
        status = client.status()
        client.close()
        # The plots got live data from the daemon while it computed.
        qtbot.waitUntil(lambda: len(window.plots.points("step_ms")[1]) > 0, timeout=WAIT_MS)
        window.close()

    assert "error" not in result, result.get("error")
    assert [s.n_blocks_remote for s in runner.stats] == [2] * 6 + [4] * 7 + [1] * 7
    assert [s.epoch for s in runner.stats][5] < runner.stats[6].epoch < runner.stats[13].epoch
    assert _rel(result["out"], expected) <= 1e-6
    assert status.hosted == [n - 1, n] and status.forward_steps == steps
    assert status.raw_bytes > 0 and status.wire_bytes >= status.raw_bytes  # raw float32 is at best 0.5x of bf16


def test_status_series_turns_counters_into_rates():
    def status(steps, raw, wire, bytes_io, last):
        return StatusReply(node="n", name="n", state="serving", model=None, hosted=[3, 5], last=True, epoch=1,
                           device="cpu", memory={}, requests=steps, errors=0, forward_steps=steps,
                           step_s={"last": last, "mean": last}, bytes_in=bytes_io, bytes_out=0, uptime_s=1.0,
                           codecs=["raw"], raw_bytes=raw, wire_bytes=wire)

    series = StatusSeries()
    assert series.add(status(0, 0, 0, 0, 0.0), 10.0) is None  # the first poll only sets the baseline
    s = series.add(status(4, 8_000, 2_000, 1_000_000, 0.012), 10.5)
    assert (s.t, s.ratio, s.step_ms, s.bytes_per_s) == (0.5, 4.0, 12.0, 2_000_000.0)
    idle = series.add(status(4, 8_000, 2_000, 1_000_100, 0.012), 11.0)
    assert idle.ratio is None and idle.step_ms is None
    assert idle.bytes_per_s == 1_000_100.0  # traffic is averaged over the last 2 s
    later = series.add(status(4, 8_000, 2_000, 1_000_100, 0.012), 13.0)
    assert later.bytes_per_s == 0.0 and later.t == 3.0


def test_block_loading_shows_progress(qtbot, tmp_path):
    settings = QSettings(str(tmp_path / "panel.ini"), QSettings.Format.IniFormat)
    window = MainWindow(NoPeers(), settings=settings)
    qtbot.addWidget(window)
    window.show()
    window.start()

    def status(state, loading):
        return StatusReply(node="n", name="n", state=state, model=None, hosted=None, last=False, epoch=1,
                           device="cpu", memory={}, requests=0, errors=0, forward_steps=0, step_s={}, bytes_in=0,
                           bytes_out=0, uptime_s=1.0, codecs=["raw"], loading=loading)

    window.controller.status.emit(status("loading", {"done": 3 * 2**20, "total": 12 * 2**20}), 1.0)
    assert window.progress.isVisible() and window.progress.value() == 250
    assert "loading blocks" in window.progress.text() and "25%" in window.progress.text()
    window.controller.status.emit(status("loading", {"done": 0, "total": 0}), 1.5)
    assert window.progress.isVisible() and window.progress.maximum() == 0  # busy: nothing read yet
    window.controller.status.emit(status("idle", None), 2.0)
    assert not window.progress.isVisible()


def _peer(node: str) -> PeerRecord:
    return PeerRecord(node=node, name=node, port=1, n_blocks=5, address="127.0.0.1")


def test_a_late_move_of_the_previous_peer_leaves_the_current_move_in_flight(qtbot, monkeypatch):
    """Move A (slow), select B, move B; A's reply lands: B's move is still in flight, so the next move waits."""
    release = {"a": threading.Event(), "b": threading.Event()}
    started, finished = [], []

    def reconfigure(peer, n_blocks, k):
        started.append((peer.node, k))
        release[peer.node].wait(10)
        finished.append((peer.node, k))
        return MoveResult(k, None, 0.0)

    monkeypatch.setattr(panel_controller, "_with_client", lambda endpoint, timeout_s, call: SimpleNamespace(n_blocks=5))
    monkeypatch.setattr(panel_controller, "_reconfigure", reconfigure)
    controller = PeerController(poll_s=60)
    try:
        controller.select(_peer("a"))
        qtbot.waitUntil(lambda: controller.info is not None)
        controller.move(3)
        qtbot.waitUntil(lambda: started == [("a", 3)])
        controller.select(_peer("b"))
        qtbot.waitUntil(lambda: controller.info is not None)
        controller.move(2)
        qtbot.waitUntil(lambda: len(started) == 2)
        release["a"].set()
        qtbot.waitUntil(lambda: ("a", 3) in finished)
        qtbot.wait(100)  # A's result reaches the GUI thread and is dropped
        controller.move(4)
        assert started == [("a", 3), ("b", 2)] and controller.busy  # coalesced, not a second RECONFIGURE
        release["b"].set()
        qtbot.waitUntil(lambda: not controller.busy)
        assert started == [("a", 3), ("b", 2), ("b", 4)]
    finally:
        for event in release.values():
            event.set()
        controller.shutdown()


def test_a_repeated_poll_error_shows_once(qtbot, monkeypatch, caplog):
    def fail(endpoint, timeout_s, call):
        raise RuntimeError("Invalid argument")  # not a PeerError: as a bug is, with the log

    monkeypatch.setattr(panel_controller, "_with_client", fail)
    controller = PeerController(poll_s=60)
    errors = []
    controller.error.connect(errors.append)
    caplog.set_level(logging.ERROR, logger="comfy_mesh.panel.controller")
    try:
        controller.select(_peer("a"))
        qtbot.waitUntil(lambda: len(errors) == 1)
        for _ in range(4):
            controller.poll()
            qtbot.waitUntil(lambda: not controller._status_in_flight)
            qtbot.wait(20)
        assert [e.split(":")[0] for e in errors] == ["could not reach a", "lost contact with a"]
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    finally:
        controller.shutdown()


class _SlowToStop(NoPeers):
    def __init__(self):
        self.release = threading.Event()
        self.stopped = threading.Event()

    def stop(self):
        self.release.wait(10)
        self.stopped.set()


def test_closing_the_window_does_not_wait_for_discovery_to_stop(qtbot, tmp_path):
    source = _SlowToStop()
    window = MainWindow(source, settings=QSettings(str(tmp_path / "panel.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(window)
    window.show()
    window.start()
    t0 = time.monotonic()
    window.close()
    assert time.monotonic() - t0 < 1.0 and not source.stopped.is_set()
    source.release.set()
    assert window.wait_stopped(10) and source.stopped.is_set()
