"""The PySide6 control panel."""
