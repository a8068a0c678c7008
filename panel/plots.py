"""Live plots of the selected daemon, from its STATUS replies: codec ratio, step time, traffic.

STATUS counters are cumulative; each poll is turned into a point from the difference
with the previous one:

- codec ratio: FORWARD tensors counted as bf16 / as encoded on the wire, over the
  steps since the last poll (needs a daemon that reports `raw_bytes`/`wire_bytes`);
- step time: the daemon's compute time of its last FORWARD, in ms;
- traffic: bytes in + out per second (all messages), averaged over the last 2 s.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import pyqtgraph as pg
from PySide6.QtWidgets import QVBoxLayout, QWidget

HISTORY = 240  # points kept per plot (two minutes at the default poll interval)
WINDOW_S = 60.0  # seconds of history shown
RATE_WINDOW_S = 2.0  # traffic is averaged over this many seconds
# plot key -> (Sample attribute, scale, title, unit)
_SERIES = {
    "ratio": ("ratio", 1.0, "codec ratio", "x"),
    "step_ms": ("step_ms", 1.0, "remote step", "ms"),
    "mbps": ("bytes_per_s", 1e-6, "traffic", "MB/s"),
}


@dataclass
class Sample:
    t: float  # seconds since the peer was selected
    ratio: float | None
    step_ms: float | None
    bytes_per_s: float


class StatusSeries:
    """Turns successive STATUS replies into plot points (pure: no Qt)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._prev = None
        self._t0: float | None = None
        self._traffic: collections.deque[tuple[float, int]] = collections.deque()  # (time, bytes in + out)
        self.samples: collections.deque[Sample] = collections.deque(maxlen=HISTORY)

    def add(self, status, now: float) -> Sample | None:
        if self._t0 is None:
            self._t0 = now
            self._traffic.append((now, status.bytes_in + status.bytes_out))
        prev, self._prev = self._prev, (status, now)
        if prev is None:
            return None
        before, then = prev
        dt = now - then
        if dt <= 0:
            return None
        steps = status.forward_steps - before.forward_steps
        # Traffic over the last RATE_WINDOW_S (steps slower than the poll would otherwise read as spikes).
        total = status.bytes_in + status.bytes_out
        self._traffic.append((now, total))
        while len(self._traffic) > 2 and now - self._traffic[1][0] >= RATE_WINDOW_S:
            self._traffic.popleft()
        t_old, total_old = self._traffic[0]
        rate = max(total - total_old, 0) / (now - t_old) if now > t_old else 0.0
        ratio = step_ms = None
        if steps > 0:
            d_raw = getattr(status, "raw_bytes", 0) - getattr(before, "raw_bytes", 0)
            d_wire = getattr(status, "wire_bytes", 0) - getattr(before, "wire_bytes", 0)
            ratio = d_raw / d_wire if d_wire > 0 and d_raw > 0 else None
            step_ms = 1000.0 * float(status.step_s.get("last", 0.0))
        sample = Sample(now - self._t0, ratio, step_ms, rate)
        self.samples.append(sample)
        return sample


class LivePlots(QWidget):
    """Three small stacked plots sharing the time axis."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.series = StatusSeries()
        pg.setConfigOptions(antialias=True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        palette = self.palette()
        self._plots = {}
        self._fg = palette.text().color().name()
        tips = {
            "ratio": "Compression of the activations that crossed: their size as bf16 divided by their size on "
                     "the wire (1x for raw)",
            "step_ms": "The daemon's compute time for its blocks in the last step",
            "mbps": "Bytes in and out of the daemon per second, all messages",
        }
        colors = {"ratio": "#2e7d32", "step_ms": "#1565c0", "mbps": "#c62828"}
        first = None
        for key, (_, _, title, _unit) in _SERIES.items():
            plot = pg.PlotWidget(background=palette.base().color())
            plot.setToolTip(tips[key])
            plot.setAccessibleName(title)
            plot.setMenuEnabled(False)
            plot.setMouseEnabled(x=False, y=False)
            plot.hideButtons()
            plot.showGrid(x=True, y=True, alpha=0.2)
            fg = palette.text().color()
            for axis in ("left", "bottom"):
                plot.getAxis(axis).setTextPen(fg)
                plot.getAxis(axis).setPen(fg)
            plot.getAxis("left").setWidth(48)
            plot.setTitle(f"{title}: -", color=self._fg, size="9pt")
            plot.setXRange(-WINDOW_S, 0, padding=0)
            plot.setYRange(0, 1, padding=0)
            plot.setMinimumHeight(60)
            if first is None:
                first = plot
            else:
                plot.setXLink(first)
            color = colors[key]
            curve = plot.plot(pen=pg.mkPen(color, width=2), symbol="o", symbolSize=4, symbolBrush=color,
                              symbolPen=None)
            self._plots[key] = (plot, curve)
            layout.addWidget(plot)
        plot.getAxis("bottom").setLabel("seconds ago")  # the shared time axis (x is linked), under the last plot

    def reset(self) -> None:
        self.series.reset()
        for key, (plot, curve) in self._plots.items():
            curve.setData([], [])
            plot.setTitle(f"{_SERIES[key][2]}: -", color=self._fg, size="9pt")

    def add_status(self, status, now: float) -> Sample | None:
        sample = self.series.add(status, now)
        if sample is None:
            return None
        samples = self.series.samples
        t_now = sample.t
        for key, (plot, curve) in self._plots.items():
            attr, scale, title, unit = _SERIES[key]
            points = [(s.t - t_now, getattr(s, attr) * scale) for s in samples if getattr(s, attr) is not None]
            curve.setData([p[0] for p in points], [p[1] for p in points])
            top = max((p[1] for p in points), default=0.0)
            plot.setYRange(0, top * 1.2 if top > 0 else 1.0, padding=0)
            last = f"{points[-1][1]:.{2 if abs(points[-1][1]) < 100 else 0}f} {unit}" if points else "-"
            plot.setTitle(f"{title}: {last}", color=self._fg, size="9pt")
        return sample

    def points(self, key: str) -> tuple[list, list]:
        """The data a plot shows (for tests and screenshots)."""
        x, y = self._plots[key][1].getData()
        return ([] if x is None else list(x)), ([] if y is None else list(y))
