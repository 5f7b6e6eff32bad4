"""Serving benchmark: a real `cellclass serve` on loopback under load, torch vs ONNX Runtime.

1. Simulates a small BPS-layout set, trains a model on it (LeNet-5 by default) and exports
   it to ONNX, all in a temporary folder (or serves ``--run RUN``).
2. Single-image inference speed, in this process: the same normalized 1-image batch
   through ``Predictor.predict_normalized`` with torch eager and with ONNX Runtime (no
   TTA), with 1 thread each (the headline) and with ``--threads`` each. Target: ONNX
   Runtime at least 1.5x faster.
3. Load: for each backend, starts ``cellclass serve RUN --backend torch|onnx --no-tta`` on
   a free port, then for concurrency 1, 8 and 32 sends ``POST /v1/predict`` (one TIFF per
   request, with a predict key) from that many asyncio workers until a request count or
   a time limit is reached; reports p50/p99 latency, requests/s and the server's mean
   batch size. Each server is stopped when its levels are done.

The client runs on the same machine as the server and takes a share of its cores: on 2
cores the figures are lower bounds of what the server does alone.

    python benchmarks/serve_load.py --quick              # under a minute: a smoke run
    python benchmarks/serve_load.py                      # the figures in docs/benchmarks.md
    python benchmarks/serve_load.py --model resnet18 --image-size 64

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = Path(sys.executable).with_name("cellclass")
LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(work: Path, model: str, image_size: int) -> tuple[Path, Path, Path]:
    """Simulated data, a trained run and its ONNX export; returns (run, onnx file, one image).

    Training and export run as `cellclass` commands, as a user runs them, so this process
    (which times single-image inference next) is not left in a state training put it in.
    """
    from cellclass.data.simulate import simulate_bps

    data, run = work / "data", work / "run"
    simulate_bps(data, n_images=68, seed=0)
    for command in (["train", data, "--preset", "bps", "--task", "particle_type", "--model", model, "--epochs", "1",
                     "--image-size", str(image_size), "--out", run], ["export", run, "--format", "onnx"]):
        result = subprocess.run([str(CLI), *map(str, command)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"cellclass {command[0]} failed:\n{result.stdout}\n{result.stderr}")
    return run, run / "model.onnx", min(data.glob("*.tif"))


def single_image_speed(run: Path, onnx_file: Path, image: Path, threads: int, repeats: int,
                       max_seconds: float) -> dict[str, float]:
    """Median milliseconds per 1-image ``predict_normalized`` call, torch eager vs ONNX Runtime.

    Rounds of 20 calls alternate between the backends (so a change in the machine's load
    hits both) until ``repeats`` calls or ``max_seconds`` per backend.
    """
    import torch

    from cellclass.data.io import read_image
    from cellclass.inference.onnx import OnnxBackend
    from cellclass.inference.predictor import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor.from_checkpoint(run, tta=False)
    x = predictor.normalize(predictor.prepare([read_image(image)]))
    backends = {"torch": None, "onnxruntime": OnnxBackend(onnx_file, list(predictor.encoders), threads=threads)}
    timings: dict[str, list[float]] = {name: [] for name in backends}
    spent = dict.fromkeys(backends, 0.0)
    for name, backend in backends.items():  # warm-up
        predictor.backend = backend
        for _ in range(5):
            predictor.predict_normalized(x)
    while min(len(t) for t in timings.values()) < repeats and min(spent.values()) < max_seconds:
        for name, backend in backends.items():
            predictor.backend = backend
            for _ in range(20):
                start = time.perf_counter()
                predictor.predict_normalized(x)
                timings[name].append(time.perf_counter() - start)
            spent[name] += sum(timings[name][-20:])
    torch_s, ort_s = statistics.median(timings["torch"]), statistics.median(timings["onnxruntime"])
    return {"torch_ms": round(torch_s * 1e3, 4), "onnxruntime_ms": round(ort_s * 1e3, 4),
            "speedup": round(torch_s / ort_s, 2), "calls_per_backend": len(timings["torch"])}


def start_server(run: Path, state: Path, backend: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "ab") as out:
        process = subprocess.Popen([str(CLI), "serve", str(run), "--port", str(port), "--state-dir", str(state),
                                    "--backend", backend, "--no-tta", "--threads", str(threads)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cellclass serve exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"cellclass serve was not ready in 120 s; see {log}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, key: str, image: bytes, name: str, concurrency: int, max_requests: int,
               max_seconds: float, server_pid: int) -> dict[str, float]:
    """Requests from ``concurrency`` workers until ``max_requests`` or ``max_seconds``.

    Also reports the CPU time per request of the server and of this client: on a machine
    with few cores they share, the client's part bounds what can be measured.
    """
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    stop_at = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=60) as client:
        for _ in range(min(concurrency, 4)):  # warm connections and the model
            await client.post("/v1/predict", files={"image": (name, image)})
        before = (await client.get("/readyz")).json().get("batching", {})
        server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()

        async def worker() -> None:
            nonlocal sent, errors
            while sent < max_requests and time.perf_counter() < stop_at:
                sent += 1
                start = time.perf_counter()
                response = await client.post("/v1/predict", files={"image": (name, image)})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
        after = (await client.get("/readyz")).json().get("batching", {})
    batches = after.get("batches", 0) - before.get("batches", 0)
    mean_batch = round((after.get("images", 0) - before.get("images", 0)) / batches, 2) if batches else None
    latencies.sort()

    def pct(q: float) -> float:
        return round(1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else float("nan")

    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "rps": round(len(latencies) / elapsed, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "server_mean_batch": mean_batch,
            "server_cpu_ms_per_request": round(1e3 * server_cpu / max(1, len(latencies)), 2),
            "client_cpu_ms_per_request": round(1e3 * client_cpu / max(1, len(latencies)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests and repeats: under a minute.")
    parser.add_argument("--run", type=Path, help="Serve this run (and RUN/model.onnx, exported when missing).")
    parser.add_argument("--model", default="lenet5", help="Model trained when --run is not given.")
    parser.add_argument("--image-size", type=int, default=32, help="Input size of the trained model.")
    parser.add_argument("--threads", type=int, default=None, help="Inference threads (default: every core).")
    parser.add_argument("--max-seconds", type=float, default=None, help="Time limit per concurrency level.")
    args = parser.parse_args()
    from cellclass.allocator import available_cores

    threads = args.threads or available_cores()
    counts = {1: 60, 8: 150, 32: 300} if args.quick else {1: 400, 8: 1500, 32: 3000}
    max_seconds = args.max_seconds or (3.0 if args.quick else 20.0)
    repeats = 200 if args.quick else 2000
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cellclass-serve-bench-") as tmp:
        work = Path(tmp)
        if args.run is not None:
            from cellclass.inference.onnx import export_onnx

            run = args.run
            onnx_file = run / "model.onnx" if (run / "model.onnx").is_file() else export_onnx(run)
            from cellclass.data.simulate import simulate_bps

            simulate_bps(work / "data", n_images=4, seed=0)
            image = min((work / "data").glob("*.tif"))
        else:
            print(f"training {args.model} ({args.image_size} px, 1 epoch) on simulated BPS nuclei ...", flush=True)
            run, onnx_file, image = prepare(work, args.model, args.image_size)
        # One thread each is the headline: on a shared machine, a 2-thread pool stalls at every
        # barrier where another process holds one of the cores.
        by_threads = {}
        for n in sorted({1, threads}):
            by_threads[f"threads_{n}"] = single_image_speed(run, onnx_file, image, n, repeats,
                                                            2.0 if args.quick else 10.0)
            figures = by_threads[f"threads_{n}"]
            print(f"single image, {n} thread(s): torch {figures['torch_ms']} ms, onnxruntime "
                  f"{figures['onnxruntime_ms']} ms ({figures['speedup']}x)", flush=True)
        single = by_threads["threads_1"]
        verdict = (f"ONNX Runtime is {single['speedup']}x faster than torch eager for one image, 1 thread each "
                   + ("(target 1.5x: met)" if single["speedup"] >= 1.5
                      else f"(target 1.5x: NOT met, short by {1.5 - single['speedup']:.2f}x)"))
        print(verdict, flush=True)
        from cellclass.serving.database import Database
        from cellclass.serving.keys import KeyStore

        state = work / "state"
        state.mkdir()
        db = Database(f"sqlite:///{state / 'cellclass.db'}")
        key = KeyStore(db).create("predict", "benchmark")[0]
        db.close()
        image_bytes = image.read_bytes()
        results: dict[str, dict[str, dict[str, float]]] = {}
        for backend in ("torch", "onnx"):
            process, url = start_server(run, state, backend, threads, work / f"{backend}.log")
            try:
                results[backend] = {}
                for level in LEVELS:
                    figures = asyncio.run(load(url, key, image_bytes, image.name, level, counts[level], max_seconds,
                                               process.pid))
                    results[backend][f"c{level}"] = figures
                    print(f"{backend:>5} concurrency {level:>2}: {figures['rps']:>7} req/s, p50 {figures['p50_ms']} ms, "
                          f"p99 {figures['p99_ms']} ms ({figures['requests']} requests, {figures['errors']} errors, "
                          f"mean batch {figures['server_mean_batch']}; CPU ms/request: server "
                          f"{figures['server_cpu_ms_per_request']}, client {figures['client_cpu_ms_per_request']})",
                          flush=True)
            finally:
                stop_server(process)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine

    summary = {
        "benchmark": "serve_load", "quick": args.quick, "model": args.model if args.run is None else str(args.run),
        "image_size": args.image_size, "threads": threads, "machine": machine(),
        "single_image": {**single, "target_speedup": 1.5, "meets_target": single["speedup"] >= 1.5, "verdict": verdict,
                         "by_threads": by_threads},
        "load": results, "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
