"""What the data-path benchmarks share: the machine's description and memory readings.

Imported by the scripts beside it (``python benchmarks/scale.py`` puts this folder first
on the import path, as Python does for any script).
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path


def machine() -> dict[str, object]:
    """Cores, CPU model, RAM, Python and torch versions, and the load when measured."""
    from cellclass.training.precision import cpu_name  # what the precision cache is keyed by

    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu_name(), "ram_gb": ram_gb, "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from ``/proc``, no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process and all its descendants, in MiB (shared pages counted per process)."""
    pid = pid or os.getpid()
    return sum(_status_kb(p, "VmRSS") for p in [pid, *descendants(pid)]) / 1024


def peak_rss_mb(pid: int | None = None) -> float:
    """``VmHWM``: the highest resident memory this one process has reached, in MiB."""
    return _status_kb(pid or os.getpid(), "VmHWM") / 1024


class RssSampler:
    """Samples the resident memory of this process tree in a thread; keeps the peak.

    Use as a context manager; ``peak_mb`` is the highest sum of ``VmRSS`` over the
    process and its descendants (loader workers) seen at any sample.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak_mb = tree_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, tree_rss_mb())
