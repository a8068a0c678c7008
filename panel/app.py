"""`comfy-mesh panel`: the PySide6 control panel (the QApplication entry point).

This module imports no Qt until `run`, so `comfy-mesh --help` stays light and a
machine without the panel extra can still run daemons (`pip install "comfy-mesh[panel]"`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from ..discovery.cli import add_discovery_arguments

log = logging.getLogger(__name__)

ORGANIZATION, APPLICATION = "comfy-mesh", "panel"  # QSettings' names: ~/.config/comfy-mesh/panel.conf on Linux


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_discovery_arguments(p)
    p.add_argument("--settings", default=None, metavar="PATH",
                   help="INI file for window geometry and the last peer (default: Qt's per-user settings)")
    p.add_argument("--poll", type=float, default=0.5, metavar="S",
                   help="seconds between STATUS polls of the selected peer (default 0.5)")
    p.add_argument("--screenshot", default=None, metavar="PNG",
                   help="save a picture of the window to PNG after --screenshot-delay seconds, then quit")
    p.add_argument("--screenshot-delay", type=float, default=8.0, metavar="S",
                   help="seconds to wait before --screenshot (default 8: peers found, a few plot points)")


def describe(args: argparse.Namespace) -> str:
    parts = []
    if not args.no_mdns:
        parts.append(f"mDNS on {', '.join(args.interface) if args.interface else 'all interfaces'}")
    if args.peer:
        parts.append(f"static {', '.join(args.peer)}")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        from PySide6.QtCore import QSettings, QTimer
        from PySide6.QtWidgets import QApplication
    except ImportError as exc:
        raise RuntimeError(f"the panel needs PySide6 and pyqtgraph ({exc}): pip install \"comfy-mesh[panel]\"") \
            from None
    from ..discovery import peer_source
    from .window import MainWindow

    if args.poll <= 0:
        raise ValueError("--poll must be a positive number of seconds")
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName("comfy-mesh panel")
    settings = QSettings(args.settings, QSettings.Format.IniFormat) if args.settings else QSettings()
    source = peer_source(interfaces=args.interface, static=args.peer, mdns=not args.no_mdns)
    window = MainWindow(source, settings=settings, poll_s=args.poll, description=describe(args))
    window.show()
    window.start()

    # Ctrl-C in the terminal closes the window (Python signal handlers run between Qt events).
    signal.signal(signal.SIGINT, lambda *_: window.close())
    wake = QTimer()
    wake.timeout.connect(lambda: None)
    wake.start(200)

    if args.screenshot:
        def shoot():
            if not window.grab().save(args.screenshot):
                log.error("could not write %s", args.screenshot)
            window.close()
        QTimer.singleShot(int(args.screenshot_delay * 1000), shoot)
    code = app.exec()
    window.wait_stopped(10)  # the window is gone; let discovery close its sockets before exiting
    return code
