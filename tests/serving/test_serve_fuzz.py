"""An independent fuzzer against a real `cellclass serve`: schemathesis, every check, each role's key.

schemathesis reads the service's OpenAPI document and sends what it describes (and what it
does not): boundary values, wrong types, malformed bodies, other methods, sequences of calls.
Every answer must be no 5xx, a documented status with a body matching its schema, the
documented content type and headers, invalid data refused and valid data accepted (see
``schemathesis.toml`` for the upload routes). Bounded: ``MAX_EXAMPLES`` per operation and
phase, ``SECONDS`` per key; the seed is fixed (``CELLCLASS_FUZZ_SEED`` picks another).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from serve_helpers import ENV, Server, write_ranking

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 30
SECONDS = 35
SEED = os.environ.get("CELLCLASS_FUZZ_SEED", "11")


@pytest.fixture(scope="module")
def fuzzed(served_run: Path, bps_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    """A server of its own (1 MiB uploads, 4 images a request, a labelling queue of four images) and one key
    per role."""
    if not SCHEMATHESIS.is_file():
        pytest.skip(f"schemathesis is not installed beside {sys.executable}; pip install 'cellclass[dev]'")
    state = tmp_path_factory.mktemp("fuzz-state")
    names = pd.read_csv(bps_dir / "meta.csv", dtype=str)["filename"].tolist()[:4]
    ranking = write_ranking(served_run, bps_dir, names, state.parent / "fuzz-rank.csv")
    server = Server(served_run, state, state.parent / "fuzz-server.log", "--max-upload-mb", "1",
                    "--queue", str(ranking), "--pool", str(bps_dir), env={"CELLCLASS_MAX_IMAGES": "4"}).start()
    keys = {role: server.key(role, f"fuzz {role}") for role in ("predict", "contribute", "curate")}
    yield server, keys
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("role", ["no key", "predict", "contribute", "curate"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(fuzzed: tuple[Server, dict[str, str]],
                                                                    role: str, tmp_path: Path) -> None:
    server, keys = fuzzed
    auth = ["--header", f"Authorization: Bearer {keys[role]}"] if role in keys else []
    command = [str(SCHEMATHESIS), "--config-file", str(CONFIG), "--no-color", "run", f"{server.url}/openapi.json",
               "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--max-time", str(SECONDS), "--seed", SEED,
               "--workers", "1", *auth]
    # One worker: Python 3.11 before 3.11.8 can fail parsing source in concurrent threads (gh-106905),
    # which schemathesis' generator does; cwd: its caches stay out of the repository.
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=ENV, check=False,
                            timeout=SECONDS + 180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"schemathesis (seed {SEED}, {role}) failed:\n{output[-12000:]}"
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counts is not None and int(counts.group(1)) == int(counts.group(2)) > 100, output[-3000:]
    assert "Exception in ASGI application" not in server.log()
