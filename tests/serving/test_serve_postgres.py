"""The contribution store and the service on a real PostgreSQL server (started here, on loopback)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serve_helpers import MULTI_DEFINITION, Server, exercise_store, free_port, upload_of, write_ranking

from cellclass.serving.contributions import ContributionStore
from cellclass.serving.database import Database
from cellclass.serving.files import LocalFileStore
from cellclass.serving.keys import KeyStore

pytestmark = pytest.mark.slow  # a PostgreSQL server and `cellclass serve`, each a real process


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port (run as 'postgres' when we are root)."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'cellclass[postgres]'")
    bindir = _pg_bin()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; install Debian's 'postgresql' "
                    "package (.ci/run does) to run these tests")
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user exists to own a PostgreSQL cluster")
        prefix = ["runuser", "-u", "postgres", "--"]
    # Under /tmp directly: pytest's own temporary folders are private to their owner.
    base = Path(tempfile.mkdtemp(prefix="cellclass-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", free_port()

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)

    try:
        result = run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "cellclass", "-E", "UTF8", "--no-sync")
        assert result.returncode == 0, result.stdout + result.stderr
        result = run(bindir / "pg_ctl", "-D", data, "-l", base / "log", "-w", "-t", "60", "-o",
                     f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                     "start")
        assert result.returncode == 0, result.stdout + result.stderr + (base / "log").read_text()
        yield f"postgresql://cellclass@127.0.0.1:{port}/postgres"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_store_round_trip_and_concurrency(postgres_url: str, tmp_path: Path) -> None:
    db = Database(postgres_url)
    assert db.dialect == "postgresql" and db.ping()
    keys = KeyStore(db)
    key, record = keys.create("curate", "pg")
    assert keys.verify(key, "contribute").key_id == record.key_id
    store = ContributionStore(db, LocalFileStore(tmp_path / "files"))
    exercise_store(store, tmp_path)
    dataset = store.register_dataset(MULTI_DEFINITION)

    def add(i: int) -> bool:
        return store.add(upload_of(1000 + i), {"loc": ["Nucleoli"], "bin": "0"}, {"i": i}, contributor="many",
                         dataset=dataset, model={})[1]

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(add, range(200)))
    db.close()
    reopened = Database(postgres_url)  # a new connection sees everything committed
    assert ContributionStore(reopened, LocalFileStore(tmp_path / "files")).list(contributor="many")[1] == 200
    reopened.close()


def test_server_on_postgres(postgres_url: str, served_run: Path, bps_images, tmp_path: Path) -> None:
    db = Database(postgres_url)
    contributor, curator = KeyStore(db).create("contribute")[0], KeyStore(db).create("curate")[0]
    db.close()
    server = Server(served_run, tmp_path / "state", tmp_path / "server.log", "--database", postgres_url).start()
    try:
        name, tif, particle = bps_images[0]
        with server.client(contributor) as c:
            created = c.post("/v1/contributions", files={"image": (name, tif)},
                             data={"labels": json.dumps({"particle_type": particle})})
            assert created.status_code == 201, created.text
        with server.client(curator) as c:
            assert c.post(f"/v1/contributions/{created.json()['id']}/accept").json()["status"] == "accepted"
    finally:
        server.stop()
    assert not (tmp_path / "state" / "cellclass.db").exists()  # nothing went to SQLite
    db = Database(postgres_url)
    rows = db.query("SELECT status FROM contributions WHERE id = ?", (created.json()["id"],))
    db.close()
    assert rows == [{"status": "accepted"}]


def test_labelling_queue_on_postgres(postgres_url: str, served_run: Path, bps_dir: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in bps_dir.glob("*.tif"))[:3]
    ranking = write_ranking(served_run, bps_dir, names, tmp_path / "rank.csv")
    db = Database(postgres_url)
    contributor = KeyStore(db).create("contribute")[0]
    db.close()
    server = Server(served_run, tmp_path / "state", tmp_path / "server.log", "--database", postgres_url,
                    "--queue", str(ranking), "--pool", str(bps_dir)).start()
    try:
        with server.client(contributor) as c:
            first = c.post("/v1/queue/1/label", json={"labels": {"particle_type": "Fe"}})
            assert first.status_code == 201, first.text
            assert c.post("/v1/queue/1/label", json={"labels": {"particle_type": "X-ray"}}).status_code == 409
            listed = c.get("/v1/queue").json()
    finally:
        server.stop()
    assert [i["rank"] for i in listed["items"]] == [2, 3] and listed["labelled"] == 1
    db = Database(postgres_url)
    rows = db.query("SELECT contribution_id FROM queue_labels")
    pending = db.query("SELECT id FROM contributions WHERE contributor = ?", (contributor.split("_")[1],))
    db.close()
    assert rows == [{"contribution_id": first.json()["id"]}] and pending == [{"id": first.json()["id"]}]
