"""The control panel's main window: the peer table above, the selected peer below.

The lower half shows the selected daemon: what it hosts, the `n_blocks_remote` slider
over the model's real block count (keyboard: arrows one block, Page Up/Down a few,
Home/End all or none), block-loading progress, live plots, and an error banner plus an
event log, so that nothing that goes wrong is only in a log file. Window geometry,
the splitter and the last selected peer are kept in QSettings.
"""

from __future__ import annotations

import logging
import threading
import time

from PySide6.QtCore import QItemSelectionModel, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QAbstractItemView, QGroupBox, QHBoxLayout, QHeaderView, QLabel, QMainWindow, QPlainTextEdit,
    QProgressBar, QPushButton, QSlider, QSplitter, QTableView, QVBoxLayout, QWidget,
)

from ..discovery.base import PeerSource
from ..discovery.record import PeerRecord
from .controller import MoveResult, PeerController
from .peer_model import MEMORY_COLUMN, DiscoveryBridge, MemoryBarDelegate, PeerTableModel
from .plots import LivePlots

log = logging.getLogger(__name__)

GEOMETRY_KEY, SPLITTER_KEY, LAST_PEER_KEY = "window/geometry", "window/splitter", "peers/last"
LAST_PEER_WAIT_S = 3.0  # how long the peer selected last time may take to be found before another is selected


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


class MainWindow(QMainWindow):
    def __init__(self, source: PeerSource, settings: QSettings | None = None, poll_s: float = 0.5,
                 description: str = "", parent: QWidget | None = None):
        """`source`: where peers come from (started by `start()`); `settings`: where geometry and the
        last peer are kept (default: Qt's per-user settings of the application); `description`: how
        discovery is set up, for the status bar."""
        super().__init__(parent)
        self.source = source
        self.settings = settings if settings is not None else QSettings()
        self.description = description
        self.setWindowTitle("comfy-mesh panel")
        self._last_peer = str(self.settings.value(LAST_PEER_KEY, "") or "")
        self._selected: str | None = None
        self._started = False
        self._stopping: threading.Thread | None = None  # discovery shutting down, off the GUI thread
        self._created = time.monotonic()

        self.model = PeerTableModel(self)
        self.bridge = DiscoveryBridge()
        self.bridge.event.connect(self._on_peer_event)
        self.controller = PeerController(poll_s=poll_s, parent=self)
        self.controller.hello.connect(self._on_hello)
        self.controller.status.connect(self._on_status)
        self.controller.moving.connect(self._on_moving)
        self.controller.moved.connect(self._on_moved)
        self.controller.error.connect(self.show_error)
        self.controller.reachable.connect(self._on_reachable)

        self._build()
        self._restore()

    # ---------------------------------------------------------------- layout

    def _build(self) -> None:
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setItemDelegateForColumn(MEMORY_COLUMN, MemoryBarDelegate(self.table))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setToolTip("comfy-mesh daemons found over mDNS or named with --peer; select one to control it")
        self.table.setAccessibleName("Peers")
        self.table.horizontalHeader().setToolTip("Hover over a column title to see what it shows")
        self.table.selectionModel().currentRowChanged.connect(self._on_current_row)

        self.peer_title = QLabel("Select a peer above.")
        self.peer_title.setTextFormat(Qt.TextFormat.PlainText)
        self.peer_title.setToolTip("The selected daemon: name, node id, endpoint and model")
        font = self.peer_title.font()
        font.setBold(True)
        self.peer_title.setFont(font)

        self.error_banner = QLabel()
        self.error_banner.setWordWrap(True)
        self.error_banner.setTextFormat(Qt.TextFormat.PlainText)
        self.error_banner.setStyleSheet("QLabel { background: #fdecea; color: #611a15; border: 1px solid #f5c2c0;"
                                        " border-radius: 4px; padding: 6px; }")
        self.error_banner.setToolTip("The last error; the event log below keeps them all")
        self.dismiss = QPushButton("&Dismiss")
        self.dismiss.setToolTip("Hide the error banner (the event log keeps the message)")
        self.dismiss.clicked.connect(self.clear_error)
        banner_row = QHBoxLayout()
        banner_row.addWidget(self.error_banner, 1)
        banner_row.addWidget(self.dismiss)
        self.banner = QWidget()
        self.banner.setLayout(banner_row)
        banner_row.setContentsMargins(0, 0, 0, 0)
        self.banner.hide()

        # The split: slider over the model's real block count.
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.slider.setTracking(False)  # a drag sends one RECONFIGURE, on release; keys send each step
        self.slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.slider.setRange(0, 0)
        self.slider.setEnabled(False)
        self.slider.setToolTip("n_blocks_remote: how many of the model's last blocks this daemon runs. Moving it "
                               "sends RECONFIGURE; a running generation follows at its next step.\n"
                               "Keys: Left/Right one block, Page Up/Down several, Home none, End all.")
        self.slider.setAccessibleName("Remote blocks")
        self.slider.valueChanged.connect(self._on_slider)
        self.slider.sliderMoved.connect(self._on_slider_dragged)
        slider_label = QLabel("&Remote blocks:")
        slider_label.setBuddy(self.slider)
        slider_label.setToolTip(self.slider.toolTip())
        self.split_label = QLabel("-")
        self.split_label.setMinimumWidth(230)
        self.split_label.setToolTip("Blocks on this daemon now, and the split a generation uses: "
                                    "local [0, s), this daemon [s, n)")
        slider_row = QHBoxLayout()
        slider_row.addWidget(slider_label)
        slider_row.addWidget(self.slider, 1)
        slider_row.addWidget(self.split_label)

        self.progress = QProgressBar()
        self.progress.setToolTip("Blocks loading on the daemon (bytes read from its checkpoint)")
        self.progress.setAccessibleName("Block loading")
        self.progress.setFormat("%p%")
        self.progress.hide()
        self.move_status = QLabel("")
        self.move_status.setToolTip("What the last split change did")

        split_box = QGroupBox("Split")
        split_box.setToolTip("Which blocks run on the selected daemon")
        split_layout = QVBoxLayout(split_box)
        split_layout.addLayout(slider_row)
        split_layout.addWidget(self.progress)
        split_layout.addWidget(self.move_status)

        self.plots = LivePlots()
        plots_box = QGroupBox("Live")
        plots_box.setToolTip("The selected daemon, from its STATUS every poll interval")
        QVBoxLayout(plots_box).addWidget(self.plots)

        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(500)
        self.log_view.setMaximumHeight(90)
        self.log_view.setToolTip("Events and errors of this session, newest last")
        self.log_view.setAccessibleName("Event log")

        details = QWidget()
        dl = QVBoxLayout(details)
        dl.addWidget(self.peer_title)
        dl.addWidget(self.banner)
        dl.addWidget(split_box)
        dl.addWidget(plots_box, 1)
        dl.addWidget(self.log_view)

        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.addWidget(self.table)
        self.splitter.addWidget(details)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 3)
        self.splitter.setToolTip("Drag to share the height between the peer table and the selected peer")
        self.splitter.setChildrenCollapsible(False)
        self.setCentralWidget(self.splitter)

        self.peer_count = QLabel()
        self.peer_count.setToolTip("Peers found, and how discovery is set up")
        self.statusBar().addPermanentWidget(self.peer_count)
        self._update_count()

        quit_action = QAction("&Quit", self)
        quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        quit_action.setToolTip("Close the panel (daemons keep running)")
        quit_action.triggered.connect(self.close)
        file_menu = self.menuBar().addMenu("&File")
        file_menu.setToolTipsVisible(True)
        file_menu.addAction(quit_action)
        self.table.setFocus()

    def _restore(self) -> None:
        geometry = self.settings.value(GEOMETRY_KEY)
        if geometry is not None and not self.restoreGeometry(geometry):
            log.debug("saved window geometry ignored")
        if geometry is None:
            self.resize(1100, 780)
        state = self.settings.value(SPLITTER_KEY)
        if state is not None:
            self.splitter.restoreState(state)
        else:
            self.splitter.setSizes([160, 620])

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "MainWindow":
        """Start discovery; rows appear as peers are found."""
        if not self._started:
            if self._stopping is not None:  # reopened right after a close: let that stop finish first
                self._stopping.join()
                self._stopping = None
            self.source.on_event(self.bridge)
            self.source.start()
            for record in self.source.peers():
                self.model.upsert(record)
                self._maybe_select(record)
            self._started = True
            QTimer.singleShot(int(LAST_PEER_WAIT_S * 1000) + 100, self._select_first)
            self.log(f"looking for peers{': ' + self.description if self.description else ''}")
        return self

    def save_settings(self) -> None:
        self.settings.setValue(GEOMETRY_KEY, self.saveGeometry())
        self.settings.setValue(SPLITTER_KEY, self.splitter.saveState())
        if self._selected:
            self.settings.setValue(LAST_PEER_KEY, self._selected)
        self.settings.sync()

    def closeEvent(self, event) -> None:
        self.save_settings()
        self.controller.shutdown()
        if self._started:
            # Stopping discovery joins its threads (seconds, for mDNS): not on the GUI thread.
            self._stopping = threading.Thread(target=self.source.stop, name="comfy-mesh-panel-stop", daemon=True)
            self._stopping.start()
            self._started = False
        super().closeEvent(event)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """After close: wait for discovery to finish stopping; True once it has."""
        thread = self._stopping
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    # ---------------------------------------------------------------- messages

    def log(self, message: str) -> None:
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  {message}")

    def show_error(self, message: str) -> None:
        self.error_banner.setText(message)
        self.banner.show()
        self.log(f"error: {message}")
        self.statusBar().showMessage("error: " + message.split("\n", 1)[0], 10_000)

    def clear_error(self) -> None:
        self.banner.hide()
        self.error_banner.clear()

    @property
    def error_text(self) -> str:
        return self.error_banner.text() if self.banner.isVisible() else ""

    # ---------------------------------------------------------------- peers

    def _on_peer_event(self, event) -> None:
        self.model.apply(event)
        record = event.record
        if event.kind == "remove":
            self.log(f"{record.name} ({record.address}:{record.port}) left")
            if record.node == self._selected:
                self._select_peer(None)
        else:
            if event.kind == "add":
                self.log(f"found {record.name} at {record.address}:{record.port} ({record.source})")
            if record.node == self._selected:
                self.controller.update_peer(record)
            self._maybe_select(record)
        self._update_count()

    def _maybe_select(self, record: PeerRecord) -> None:
        """With nothing selected: select the peer selected last time, or, once it had
        LAST_PEER_WAIT_S to show up, whichever peer comes first."""
        if self._selected is not None:
            return
        waiting = time.monotonic() - self._created < LAST_PEER_WAIT_S
        if record.node == self._last_peer or not self._last_peer or not waiting:
            self.select_node(record.node)

    def _select_first(self) -> None:
        if self._selected is None and self.model.rowCount():
            self.select_node(self.model.record(0).node)

    def select_node(self, node: str) -> None:
        row = self.model.row_of(node)
        if row is None:
            return
        self.table.selectionModel().setCurrentIndex(
            self.model.index(row, 0),
            QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows)

    def _on_current_row(self, current, _previous) -> None:
        self._select_peer(self.model.record(current.row()) if current.isValid() else None)

    def _select_peer(self, record: PeerRecord | None) -> None:
        node = record.node if record else None
        if node == self._selected and record is not None:
            return
        self._selected = node
        self.plots.reset()
        self.progress.hide()
        self.move_status.clear()
        self.slider.setEnabled(False)
        if record is None:
            self.peer_title.setText("Select a peer above.")
            self.split_label.setText("-")
        else:
            self.peer_title.setText(f"{record.name}  ·  node {record.node}  ·  {record.endpoint}  ·  "
                                    f"{record.model or 'no model'}")
            self.settings.setValue(LAST_PEER_KEY, node)
        self.controller.select(record)

    def _update_count(self) -> None:
        n = self.model.rowCount()
        text = f"{n} peer{'s' if n != 1 else ''}"
        self.peer_count.setText(f"{text} · {self.description}" if self.description else text)

    def _on_reachable(self, node: str, ok: bool) -> None:
        self.model.set_state(node, None if ok else "unreachable")
        if ok:
            row = self.model.row_of(node)
            self.log(f"{self.model.record(row).name if row is not None else node} answers again")
            self.clear_error()

    # ---------------------------------------------------------------- selected peer

    def _on_hello(self, hello) -> None:
        n = hello.n_blocks
        self.slider.blockSignals(True)
        self.slider.setRange(0, n)
        self.slider.setPageStep(max(1, n // 8))
        self.slider.setTickInterval(max(1, n // 16))
        self.slider.setValue(_remote_count(hello.hosted, n))
        self.slider.blockSignals(False)
        self.slider.setEnabled(True)
        self._show_split(hello.hosted, n)
        self.log(f"{hello.name}: {hello.family or 'model'} with {n} blocks, hosting "
                 f"{_range_text(hello.hosted)}, plan epoch {hello.epoch}, device {hello.device}")

    def _on_status(self, status, now: float) -> None:
        self.plots.add_status(status, now)
        loading = getattr(status, "loading", None)
        if status.state == "loading" or loading:
            done, total = (loading or {}).get("done", 0), (loading or {}).get("total", 0)
            if total:
                self.progress.setRange(0, 1000)
                self.progress.setValue(int(1000 * done / total))
                self.progress.setFormat(f"loading blocks: %p% ({_mb(done)} of {_mb(total)})")
            else:
                self.progress.setRange(0, 0)  # busy: building modules or freeing memory
                self.progress.setFormat("loading blocks")
            self.progress.show()
            if self._selected:
                pct = f" {int(100 * done / total)}%" if total else ""
                self.model.set_state(self._selected, f"loading{pct}")
        elif not self.controller.busy:
            self.progress.hide()
            if self._selected:
                self.model.set_state(self._selected, None)
        info = self.controller.info
        if info is not None and not self.controller.busy and not self.slider.isSliderDown():
            k = _remote_count(status.hosted, info.n_blocks)
            if k != self.slider.value():  # moved by someone else (another panel, a generation)
                self.slider.blockSignals(True)
                self.slider.setValue(k)
                self.slider.blockSignals(False)
            self._show_split(status.hosted, info.n_blocks)

    def _on_slider_dragged(self, value: int) -> None:
        info = self.controller.info
        if info is not None:
            self.split_label.setText(f"release to move to {value} of {info.n_blocks} remote")

    def _on_slider(self, value: int) -> None:
        self.controller.move(value)

    def _on_moving(self, k: int) -> None:
        info = self.controller.info
        n = info.n_blocks if info else 0
        self.move_status.setText(f"moving the split to {k} remote block{'s' if k != 1 else ''} ...")
        self.progress.setRange(0, 0)
        self.progress.setFormat("waiting for the daemon")
        self.progress.show()
        self.log(f"RECONFIGURE: {k} of {n} blocks remote")

    def _on_moved(self, result: MoveResult) -> None:
        reply = result.reply
        info = self.controller.info
        n = info.n_blocks if info else 0
        loaded = f"loaded {_mb(reply.loaded_bytes)} in {reply.seconds:.2f} s" if reply.loaded_bytes else \
            "nothing to load"
        text = f"now hosting {_range_text(reply.hosted)} (plan epoch {reply.epoch}); {loaded}"
        self.move_status.setText(text)
        self.log(text)
        if not self.controller.busy:
            self.progress.hide()
            self._show_split(reply.hosted, n)
        self.clear_error()

    def _show_split(self, hosted, n: int) -> None:
        k = _remote_count(hosted, n)
        self.split_label.setText(f"{k} of {n} remote: local [0, {n - k}), here {_range_text(hosted)}")


def _remote_count(hosted, n: int) -> int:
    return n - hosted[0] if hosted else 0


def _range_text(hosted) -> str:
    return f"[{hosted[0]}, {hosted[1]})" if hosted else "nothing"
