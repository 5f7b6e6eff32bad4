"""Contributions end to end: contribute, accept, export, retrain; 500 at once; a restart keeps them."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from serve_helpers import Server, make_key, npy_bytes, run_cellclass

pytestmark = pytest.mark.slow  # every test trains its run through the CLI or starts `cellclass serve` (a real process)


def test_accepted_contributions_export_and_train(server: Server, keys: dict[str, str], bps_images,
                                                 tmp_path: Path) -> None:
    chosen = bps_images[20:44]
    with server.client(keys["contribute_b"]) as contributor, server.client(keys["curate"]) as curator:
        ids = []
        for i, (name, tif, particle) in enumerate(chosen):
            response = contributor.post("/v1/contributions", files={"image": (name, tif)},
                                        data={"labels": json.dumps({"particle_type": particle}),
                                              "metadata": json.dumps({"plate": name.split("_")[0], "index": i})})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        for contribution_id in ids[:-2]:
            assert curator.post(f"/v1/contributions/{contribution_id}/accept").status_code == 200
        assert curator.post(f"/v1/contributions/{ids[-1]}/reject").status_code == 200
        accepted = curator.get("/v1/contributions", params={"status": "accepted", "limit": 1000}).json()

    out = tmp_path / "export"
    result = run_cellclass("contributions", "export", "--state-dir", server.state_dir, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{accepted['total']} accepted contribution(s)" in result.stdout
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert len(manifest) == accepted["total"]
    assert set(ids[:-2]) <= set(manifest["contribution_id"]) and ids[-1] not in set(manifest["contribution_id"])
    assert {"filename", "particle_type", "contributor", "metadata"} <= set(manifest.columns)
    assert all((out / f).is_file() for f in manifest["filename"])
    by_id = manifest.set_index("contribution_id")
    for contribution_id, (name, _, particle) in zip(ids[:-2], chosen[:-2], strict=True):
        assert by_id.loc[contribution_id, "particle_type"] == particle
        assert json.loads(by_id.loc[contribution_id, "metadata"])["plate"] == name.split("_")[0]
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert spec["tasks"][0]["name"] == "particle_type" and spec["tasks"][0]["classes"] == ["Fe", "X-ray"]
    assert spec["image"]["column"] == "filename"

    run = tmp_path / "retrained"
    result = run_cellclass("train", out / "dataset.yaml", "--model", "lenet5", "--epochs", "1", "--image-size", "32",
                           "--split", "random", "--out", run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run / "checkpoints" / "best.ckpt").is_file()
    encoders = json.loads((run / "encoders.json").read_text())
    assert encoders["particle_type"]["classes"] == ["Fe", "X-ray"]


def test_export_errors(tmp_path: Path) -> None:
    result = run_cellclass("contributions", "export", "--state-dir", tmp_path / "empty", "--out", tmp_path / "out")
    assert result.returncode == 2 and "no contribution with status 'accepted' to export" in result.stderr
    result = run_cellclass("contributions", "export", "--state-dir", tmp_path / "empty", "--out", tmp_path / "out",
                           "--dataset", "abc")
    assert result.returncode == 2 and "no dataset 'abc' in the contribution store" in result.stderr


def test_500_concurrent_contributions_lose_none_and_a_restart_keeps_the_accepted(
        served_run: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    contributor, curator = make_key(state, "contribute"), make_key(state, "curate")
    rng = np.random.default_rng(0)
    images = [npy_bytes(rng.integers(0, 65535, (24, 24), dtype=np.uint16)) for _ in range(500)]
    server = Server(served_run, state, tmp_path / "server.log").start()
    try:
        with server.client(contributor, limits=httpx.Limits(max_connections=64)) as c:
            def post(i: int) -> int:
                response = c.post("/v1/contributions", files={"image": (f"cell_{i:03d}.npy", images[i])},
                                  data={"labels": json.dumps({"particle_type": "Fe" if i % 2 else "X-ray"})})
                return response.status_code

            with ThreadPoolExecutor(max_workers=48) as pool:
                statuses = list(pool.map(post, range(500)))
        assert statuses.count(201) == 500, {s: statuses.count(s) for s in set(statuses)}
        with server.client(curator) as c:
            listed = c.get("/v1/contributions", params={"limit": 1000}).json()
            assert listed["total"] == 500 and len({r["id"] for r in listed["items"]}) == 500
            to_accept = sorted(r["id"] for r in listed["items"])[::2]

            def accept(contribution_id: str) -> int:
                return c.post(f"/v1/contributions/{contribution_id}/accept").status_code

            with ThreadPoolExecutor(max_workers=32) as pool:
                assert set(pool.map(accept, to_accept)) == {200}
    finally:
        server.stop()
    with sqlite3.connect(state / "cellclass.db") as db:
        assert db.execute("SELECT COUNT(*) FROM contributions").fetchone()[0] == 500
    assert len([p for p in (state / "files").rglob("*.npy")]) == 500

    restarted = Server(served_run, state, tmp_path / "server2.log").start()
    try:
        with restarted.client(curator) as c:
            accepted = c.get("/v1/contributions", params={"status": "accepted", "limit": 1000}).json()
            pending = c.get("/v1/contributions", params={"status": "pending", "limit": 1000}).json()
    finally:
        restarted.stop()
    assert sorted(r["id"] for r in accepted["items"]) == to_accept and accepted["total"] == 250
    assert pending["total"] == 250


def test_keys_cli_create_list_revoke(tmp_path: Path) -> None:
    from cellclass.errors import AuthenticationError
    from cellclass.serving.database import Database
    from cellclass.serving.keys import KeyStore

    role = "contribute"
    result = run_cellclass("keys", "create", "--role", role, "--name", "bench", "--state-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("cc_")
    db = Database(f"sqlite:///{tmp_path / 'cellclass.db'}")
    assert KeyStore(db).verify(key, "predict").role == role
    listing = run_cellclass("keys", "list", "--state-dir", tmp_path).stdout
    key_id = key.split("_")[1]
    assert key_id in listing and role in listing and key.split("_", 2)[2] not in listing
    assert run_cellclass("keys", "revoke", key_id, "--state-dir", tmp_path).returncode == 0
    with pytest.raises(AuthenticationError, match="was revoked"):
        KeyStore(db).verify(key, "predict")
    db.close()


def test_keys_cli_errors(tmp_path: Path) -> None:
    result = run_cellclass("keys", "create", "--role", "admin", "--state-dir", tmp_path)
    assert result.returncode == 2 and "unknown key role 'admin'; valid: predict, contribute, curate" in result.stderr
    result = run_cellclass("keys", "revoke", "deadbeef", "--state-dir", tmp_path)
    assert result.returncode == 2 and "no API key with id 'deadbeef'" in result.stderr
    result = run_cellclass("keys", "list", "--database", "mysql://x@y/z")
    assert result.returncode == 2 and "unsupported database URL 'mysql://x@y/z'" in result.stderr
