"""The per-node server: ROUTER socket, sessions, the worker that runs hosted blocks."""
