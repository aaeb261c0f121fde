"""Imported by Python at start-up when ``tests/`` is on PYTHONPATH (every test subprocess): keeps
the subprocess on 127.0.0.1 (`network_guard`)."""

import network_guard

network_guard.install()
