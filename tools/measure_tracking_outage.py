"""How long a run waits on a tracking server that accepts connections and never answers.

Starts such a server on a free local port, then times `Tracker.start` against it: the wait a
training run pays once before it turns tracking off and goes on. The HTTP settings are
mae_scale.tracking's unless the environment sets MLflow's own variables, so the earlier settings
can be measured side by side:

    python tools/measure_tracking_outage.py
    MLFLOW_HTTP_REQUEST_TIMEOUT=20 MLFLOW_HTTP_REQUEST_MAX_RETRIES=2 python tools/measure_tracking_outage.py
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path


def silent_server() -> tuple[socket.socket, int]:
    """A listening socket that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def main() -> None:
    from mae_scale.tracking import Tracker  # sets MLflow's HTTP defaults where the environment has none

    server, port = silent_server()
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(True, f"http://127.0.0.1:{port}", "outage", Path(tmp))
        started = time.perf_counter()
        tracker.start("outage", {"a": 1})
        waited = time.perf_counter() - started
    server.close()
    settings = {k: os.environ[k] for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")}
    print(f"tracking off after {waited:.1f} s (still on: {tracker.enabled}); settings {settings}")


if __name__ == "__main__":
    main()
