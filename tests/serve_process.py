"""`moepager serve` started as a user starts it, in its own process on a free loopback port, stopped by the
test that started it (by its process id). The line serve prints once the model is loaded must name its URL."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request


@contextlib.contextmanager
def serve_process(*args: str, timeout: float = 120):
    """Yield the base URL once /health answers; terminate the process after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moepager", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, f"serve did not answer /health within {timeout} s"
                time.sleep(0.2)
        announced = proc.stdout.readline()  # printed before the server answers anything
        assert f"{base}/v1" in announced, announced
        # the rest of stdout (uvicorn's access log) is read and dropped, so the server never blocks writing it
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
