"""Helpers of the serving tests: run the CLI, start real servers, make images and keys."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

CELLCLASS = Path(sys.executable).with_name("cellclass")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}


def run_cellclass(*args: object, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as a user would."""
    return subprocess.run([str(CELLCLASS), *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiff_bytes(array: np.ndarray) -> bytes:
    """An in-memory TIFF of a (C, H, W) or (H, W) array."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array if array.ndim == 2 or array.shape[0] > 1 else array[0], photometric="minisblack")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """An in-memory NPY file."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class Server:
    """A real `cellclass serve` process on a free loopback port.

    Args:
        run: Run folder to serve.
        state_dir: State folder.
        log: File receiving the server's output.
        extra: More command-line options.
        env: Extra environment variables.
    """

    def __init__(self, run: Path, state_dir: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.run, self.state_dir, self.log_path = run, state_dir, log
        self.extra, self.env = extra, {**ENV, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> Server:
        """Start and wait until /readyz answers 200."""
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(CELLCLASS), "serve", str(self.run), "--port", str(self.port), "--state-dir", str(self.state_dir),
                 *self.extra], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cellclass serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"cellclass serve was not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), killing after 20 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, key: str | None = None, **kwargs: object) -> httpx.Client:
        """An HTTP client for this server, sending ``key`` as a bearer token."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def key(self, role: str, name: str = "") -> str:
        """Make an API key in this server's state folder (through the library)."""
        return make_key(self.state_dir, role, name)


def make_key(state_dir: Path, role: str, name: str = "") -> str:
    """Make an API key in the SQLite database of ``state_dir``."""
    from cellclass.serving.database import Database
    from cellclass.serving.keys import KeyStore

    db = Database(f"sqlite:///{(state_dir / 'cellclass.db').as_posix()}")
    try:
        return KeyStore(db).create(role, name)[0]
    finally:
        db.close()
