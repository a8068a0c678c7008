"""The peer table: a QAbstractTableModel over discovery's records, and the VRAM bar delegate.

Rows are keyed by node id. Discovery calls back from its own threads; `DiscoveryBridge`
turns those calls into a Qt signal, so the model only ever changes on the GUI thread.
"""

from __future__ import annotations

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, Qt, Signal
from PySide6.QtWidgets import QApplication, QStyle, QStyledItemDelegate, QStyleOptionProgressBar

from ..discovery.base import ADD, REMOVE, UPDATE, PeerEvent
from ..discovery.cli import blocks_text, memory_text
from ..discovery.record import PeerRecord

COLUMNS = ("Name", "Address", "GPU", "Memory", "Codecs", "Blocks", "State")
COLUMN_TIPS = (
    "The daemon's name (--name; its host name by default)",
    "Where the panel reaches the daemon: address and ZeroMQ port",
    "The GPU the daemon computes on; CPU for a node without one",
    "Memory used of total: the card's VRAM, or on a CPU-only node this process's resident memory of the "
    "machine's RAM (labelled 'process')",
    "Activation codecs the daemon can use in both directions",
    "Blocks the daemon hosts now, half-open [start, end), of the model's total",
    "serving, loading (blocks moving in or out), idle (hosts no blocks), or unreachable",
)
MEMORY_COLUMN = COLUMNS.index("Memory")
MEMORY_ROLE = Qt.ItemDataRole.UserRole + 1  # (used, total, kind) for the bar delegate
NODE_ROLE = Qt.ItemDataRole.UserRole + 2


class DiscoveryBridge(QObject):
    """Receives discovery events on any thread; re-emits them on the GUI thread."""

    event = Signal(object)  # PeerEvent

    def __call__(self, event: PeerEvent) -> None:
        try:
            self.event.emit(event)
        except RuntimeError:  # the window is gone while discovery shuts down
            pass


class PeerTableModel(QAbstractTableModel):
    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._rows: list[PeerRecord] = []
        self._state: dict[str, str] = {}  # node -> the panel's own view ("unreachable", "loading 40%")

    # ---------------------------------------------------------------- updates (GUI thread)

    def apply(self, event: PeerEvent) -> None:
        if event.kind in (ADD, UPDATE):
            self.upsert(event.record)
        elif event.kind == REMOVE:
            self.remove(event.record.node)

    def upsert(self, record: PeerRecord) -> None:
        row = self.row_of(record.node)
        if row is None:
            self.beginInsertRows(QModelIndex(), len(self._rows), len(self._rows))
            self._rows.append(record)
            self.endInsertRows()
        else:
            self._rows[row] = record
            self.dataChanged.emit(self.index(row, 0), self.index(row, len(COLUMNS) - 1))

    def remove(self, node: str) -> None:
        row = self.row_of(node)
        if row is not None:
            self.beginRemoveRows(QModelIndex(), row, row)
            del self._rows[row]
            self.endRemoveRows()
        self._state.pop(node, None)

    def set_state(self, node: str, state: str | None) -> None:
        """The panel's own state for a row (None: show what the daemon announces)."""
        if self._state.get(node) == state:
            return
        if state is None:
            self._state.pop(node, None)
        else:
            self._state[node] = state
        row = self.row_of(node)
        if row is not None:
            i = self.index(row, COLUMNS.index("State"))
            self.dataChanged.emit(i, i)

    def row_of(self, node: str) -> int | None:
        for i, r in enumerate(self._rows):
            if r.node == node:
                return i
        return None

    def record(self, row: int) -> PeerRecord | None:
        return self._rows[row] if 0 <= row < len(self._rows) else None

    def records(self) -> list[PeerRecord]:
        return list(self._rows)

    # ---------------------------------------------------------------- Qt model

    def rowCount(self, parent: QModelIndex | None = None) -> int:
        return 0 if parent is not None and parent.isValid() else len(self._rows)

    def columnCount(self, parent: QModelIndex | None = None) -> int:
        return 0 if parent is not None and parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and 0 <= section < len(COLUMNS):
            if role == Qt.ItemDataRole.DisplayRole:
                return COLUMNS[section]
            if role == Qt.ItemDataRole.ToolTipRole:
                return COLUMN_TIPS[section]
        return None

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        r = self.record(index.row()) if index.isValid() else None
        if r is None:
            return None
        col = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            return self.text(r, col)
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.tooltip(r, col)
        if role == MEMORY_ROLE:
            return (r.vram_used, r.vram_total, r.memory_kind)
        if role == NODE_ROLE:
            return r.node
        return None

    def text(self, r: PeerRecord, col: int) -> str:
        name = COLUMNS[col]
        if name == "Name":
            return r.name
        if name == "Address":
            return f"{r.address}:{r.port}"
        if name == "GPU":
            return ", ".join(r.gpus) if r.gpus else "CPU"
        if name == "Memory":
            return memory_text(r)
        if name == "Codecs":
            return ", ".join(r.codecs)
        if name == "Blocks":
            return blocks_text(r)
        return self._state.get(r.node, r.state)

    def tooltip(self, r: PeerRecord, col: int) -> str:
        head = f"{r.name} (node {r.node}, comfy-mesh {r.software or '?'}, protocol {r.proto}, found by {r.source})"
        name = COLUMNS[col]
        if name == "Memory":
            what = "VRAM of the card" if r.memory_kind == "cuda" else \
                "resident memory of the daemon process, of the machine's RAM (no GPU)"
            return f"{head}\n{memory_text(r)}: {what}"
        if name == "Codecs":
            return f"{head}\nencodes: {', '.join(r.encode) or '-'}\ndecodes: {', '.join(r.decode) or '-'}"
        if name == "Blocks":
            return f"{head}\nmodel {r.model or '?'} (fingerprint {r.model_fingerprint or '?'}), plan epoch {r.epoch}"
        return f"{head}\n{COLUMN_TIPS[col]}"


class MemoryBarDelegate(QStyledItemDelegate):
    """Paints the Memory column as a bar: used of total, with the figures on it."""

    def paint(self, painter, option, index) -> None:
        value = index.data(MEMORY_ROLE)
        if not value:
            return super().paint(painter, option, index)
        used, total, _kind = value
        bar = QStyleOptionProgressBar()
        bar.rect = option.rect.adjusted(2, 3, -2, -3)
        bar.minimum, bar.maximum = 0, 1000
        bar.progress = int(1000 * used / total) if total else 0
        bar.text = index.data(Qt.ItemDataRole.DisplayRole)
        bar.textVisible = True
        bar.textAlignment = Qt.AlignmentFlag.AlignCenter
        bar.state = option.state
        bar.palette = option.palette
        style = option.widget.style() if option.widget is not None else QApplication.style()
        if option.state & QStyle.StateFlag.State_Selected:
            painter.fillRect(option.rect, option.palette.highlight())
        style.drawControl(QStyle.ControlElement.CE_ProgressBar, bar, painter, option.widget)

    def sizeHint(self, option, index):
        size = super().sizeHint(option, index)
        size.setWidth(max(size.width() + 24, 170))
        return size
