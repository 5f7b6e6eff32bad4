"""BPS retrieval against a real S3 protocol server on loopback (moto_server), seeded with
simulated BPS files: filters, resume after an interruption, corrupt objects, the spec."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cellclass.data.fetch import _download, fetch_bps, make_client, select_bps_rows
from cellclass.data.presets import load_spec
from cellclass.data.validate import validate
from cellclass.errors import FetchError

PREFIX = "Microscopy/train"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server started for the test session on a free loopback port."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.is_file():
        pytest.skip(f"moto_server not found beside {sys.executable}; install the dev extra (moto[server])")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not answer on {url}")
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.kill()
        proc.wait()


def _admin(endpoint: str):
    import boto3

    # moto needs (any) credentials to create buckets and upload; the fetch client is unsigned.
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def bucket(s3_endpoint: str, bps_dir: Path) -> str:
    """A fresh public bucket holding the simulated BPS set under Microscopy/train/."""
    name = f"bps-{uuid.uuid4().hex[:12]}"
    admin = _admin(s3_endpoint)
    admin.create_bucket(Bucket=name)
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}
    admin.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
    for path in sorted(bps_dir.iterdir()):
        if path.suffix in (".tif", ".csv"):
            admin.upload_file(str(path), name, f"{PREFIX}/{path.name}")
    return name


def _meta(bps_dir: Path) -> pd.DataFrame:
    return pd.read_csv(bps_dir / "meta.csv", dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_fetch_with_filters_writes_checked_files_and_a_valid_spec(s3_endpoint: str, bucket: str, bps_dir: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "bps"
    seen: list[tuple[str, int, int]] = []
    result = fetch_bps(out, hours=[4, 24], particles=["fe"], doses=[0.82, 0], endpoint_url=s3_endpoint,
                       bucket=bucket, workers=4, progress=lambda *call: seen.append(call))
    meta = _meta(bps_dir)
    expected = meta[(meta.particle_type == "Fe") & meta.hr_post_exposure.isin(["4", "24"])
                    & meta.dose_Gy.astype(float).isin([0.82, 0.0])]
    assert result.ok and result.selected == result.downloaded == len(expected) > 0 and result.skipped == 0
    assert sorted(p.name for p in out.glob("*.tif")) == sorted(expected.filename)
    for name in expected.filename:
        assert (out / name).read_bytes() == (bps_dir / name).read_bytes()
    assert seen[-1] == ("downloading", len(expected), len(expected))
    assert pd.read_csv(out / "meta.csv", dtype=str)["filename"].tolist() == expected.filename.tolist()
    assert (out / "meta.source.csv").read_bytes() == (bps_dir / "meta.csv").read_bytes()
    report = validate(load_spec(result.spec))
    assert report.ok and report.n_rows == len(expected)
    assert json.loads((out / "fetch.json").read_text())["downloaded"] == len(expected)
    assert not list(out.glob(".*part*"))


@pytest.mark.slow
def test_an_interrupted_fetch_resumes_without_downloading_finished_files(s3_endpoint: str, bucket: str,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "bps"

    class Interrupt(Exception):
        pass

    def stop_after_ten(stage: str, done: int, total: int) -> None:
        if done >= 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        fetch_bps(out, endpoint_url=s3_endpoint, bucket=bucket, workers=2, progress=stop_after_ten)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    assert 10 <= len(finished) < 68 and not (out / "meta.csv").exists()
    result = fetch_bps(out, endpoint_url=s3_endpoint, bucket=bucket, workers=4)
    assert result.ok and result.skipped == len(finished) and result.downloaded == 68 - len(finished)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif") if p.name in finished} == finished
    again = fetch_bps(out, endpoint_url=s3_endpoint, bucket=bucket)
    assert again.downloaded == 0 and again.skipped == 68


@pytest.mark.slow
def test_a_corrupt_object_is_reported_and_not_kept(s3_endpoint: str, bucket: str, bps_dir: Path,
                                                   tmp_path: Path) -> None:
    names = select_bps_rows(_meta(bps_dir), limit=12).filename.tolist()
    broken = names[5]
    data = (bps_dir / broken).read_bytes()
    _admin(s3_endpoint).put_object(Bucket=bucket, Key=f"{PREFIX}/{broken}", Body=data[: len(data) // 3])
    _admin(s3_endpoint).delete_object(Bucket=bucket, Key=f"{PREFIX}/{names[7]}")
    out = tmp_path / "bps"
    result = fetch_bps(out, endpoint_url=s3_endpoint, bucket=bucket, limit=12, retries=1, backoff=0.01)
    reasons = {p.filename: p.reason for p in result.problems}
    assert set(reasons) == {broken, names[7]} and not result.ok
    assert reasons[broken].startswith(f"corrupt: {len(data) // 3} bytes as listed, but cannot")
    assert reasons[names[7]].startswith("not in the bucket listing")
    assert not (out / broken).exists() and not (out / names[7]).exists()
    kept = pd.read_csv(out / "meta.csv")["filename"].tolist()
    assert len(kept) == result.downloaded == 10 and broken not in kept
    assert validate(load_spec(result.spec)).ok


class _Body:
    def __init__(self, data: bytes) -> None:
        self._io = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._io.read(n)


class _FlakyClient:
    """Serves one object; the first ``short`` responses end early, as a dropped connection."""

    def __init__(self, data: bytes, length: int, short: int) -> None:
        self.data, self.length, self.short, self.calls = data, length, short, 0

    def get_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 (boto3's names)
        self.calls += 1
        body = self.data[: len(self.data) // 2] if self.calls <= self.short else self.data
        return {"ContentLength": self.length, "Body": _Body(body)}


def test_short_reads_are_retried_and_size_mismatches_refused(bps_dir: Path, tmp_path: Path) -> None:
    name = _meta(bps_dir).filename[0]
    data = (bps_dir / name).read_bytes()
    flaky = _FlakyClient(data, len(data), short=2)
    assert _download(flaky, "b", name, tmp_path / name, len(data), retries=3, backoff=0.001) == len(data)
    assert flaky.calls == 3 and (tmp_path / name).read_bytes() == data
    dead = _FlakyClient(data, len(data), short=99)
    with pytest.raises(Exception, match=rf"failed after 2 attempt\(s\): received {len(data) // 2} of {len(data)} bytes"):
        _download(dead, "b", name, tmp_path / "x.tif", len(data), retries=1, backoff=0.001)
    changed = _FlakyClient(data, len(data) + 5, short=0)
    with pytest.raises(Exception, match=rf"size mismatch: the object is {len(data) + 5} bytes, the bucket listing says {len(data)}"):
        _download(changed, "b", name, tmp_path / "y.tif", len(data), retries=3, backoff=0.001)
    assert changed.calls == 1  # not retried: the object itself disagrees with the listing
    assert not (tmp_path / "x.tif").exists() and not list(tmp_path.glob(".*part*"))


def test_selection_limits_spread_over_conditions(bps_dir: Path) -> None:
    meta = _meta(bps_dir)
    picked = select_bps_rows(meta, limit=17)
    assert len(picked) == 17 and picked.filename.str[:4].nunique() == 17  # one per plate
    assert len(select_bps_rows(meta, doses=[1])) == len(meta[meta.dose_Gy == "1.0"])
    with pytest.raises(FetchError, match=r"hours value 5 is not in meta.csv; valid: 4, 24, 48"):
        select_bps_rows(meta, hours=[5])
    with pytest.raises(FetchError, match=r"particle type\(s\) \['proton'\] are not in meta.csv; valid: Fe, X-ray"):
        select_bps_rows(meta, particles=["proton"])
    with pytest.raises(FetchError, match="limit 0 is invalid"):
        select_bps_rows(meta, limit=0)


@pytest.mark.slow
def test_fetch_errors_say_what_to_check(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"cannot download s3://no-such-bucket-x/Microscopy/train/meta.csv: "
                                         r"bucket 'no-such-bucket-x' does not exist; check --endpoint-url"):
        fetch_bps(tmp_path / "a", endpoint_url=s3_endpoint, bucket="no-such-bucket-x", retries=0)
    with pytest.raises(FetchError, match=r"cannot download s3://.*/elsewhere/meta.csv: no object 'elsewhere/meta.csv'"):
        fetch_bps(tmp_path / "b", endpoint_url=s3_endpoint, bucket=bucket, prefix="elsewhere", retries=0)
    _admin(s3_endpoint).put_object(Bucket=bucket, Key="odd/meta.csv", Body=b"name,label\na.tif,x\n")
    with pytest.raises(FetchError, match=r"meta.csv lacks column\(s\) \['filename', 'dose_Gy'"):
        fetch_bps(tmp_path / "c", endpoint_url=s3_endpoint, bucket=bucket, prefix="odd")
    with pytest.raises(FetchError, match="workers 0 is invalid"):
        fetch_bps(tmp_path / "d", workers=0)
    with pytest.raises(FetchError, match="retries -1 and backoff 0.5 are invalid"):
        fetch_bps(tmp_path / "d", retries=-1)


@pytest.mark.slow
def test_unsigned_client_reads_the_public_bucket(s3_endpoint: str, bucket: str) -> None:
    from botocore import UNSIGNED

    client = make_client(s3_endpoint)
    assert client.meta.config.signature_version is UNSIGNED  # anonymous: no credentials sent
    keys = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/meta")["Contents"]
    assert [k["Key"] for k in keys] == [f"{PREFIX}/meta.csv"]


@pytest.mark.slow
def test_fetch_command_downloads_and_reports(s3_endpoint: str, bucket: str, tmp_path: Path, cli) -> None:
    out = tmp_path / "bps"
    done = cli("fetch", "bps", out, "--endpoint-url", s3_endpoint, "--bucket", bucket, "--hours", "4",
               "--particles", "Fe,X-ray", "--limit", "6", "--workers", "3")
    assert done.returncode == 0, done.stderr
    assert "6 image(s) selected: 6 downloaded" in done.stdout and (out / "cellclass.yaml").is_file()
    bad = cli("fetch", "bps", out, "--endpoint-url", s3_endpoint, "--bucket", bucket, "--doses", "x")
    assert bad.returncode == 2 and "--doses 'x' is invalid" in bad.stderr
