"""The S3 test server (moto on 127.0.0.1) and fault proxy, driven by the real s3fs client.

These tests pin down what the client stack does on its own (retries, checksums, create-only writes)
so deltahub's object-storage registry knows what it must add on top: its own size + sha256 checks.
"""

from __future__ import annotations

import errno
import socket
import time

import pytest

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
import aiohttp
import botocore.exceptions
from s3server import NonLoopbackError, aws_env

DATA = bytes(range(256)) * 40  # 10 KiB


# guard, server, proxy and bucket: the shared S3 fixtures of tests/conftest.py


@pytest.fixture(scope="module")
def fs(server):
    return s3fs.S3FileSystem(**server.storage_options())


@pytest.fixture(scope="module")
def pfs(proxy):
    """s3fs through the proxy; s3fs's own retry loop cut to 2 tries to keep failing cases fast."""
    f = s3fs.S3FileSystem(**proxy.storage_options())
    f.retries = 2
    return f


# ------------------------------------------------------------------------------------ plain server


def test_endpoint_is_loopback_on_free_port(server, proxy):
    assert server.endpoint_url.startswith("http://127.0.0.1:")
    assert proxy.endpoint_url.startswith("http://127.0.0.1:")
    assert server.endpoint_url != proxy.endpoint_url


def test_round_trip(fs, bucket):
    path = f"{bucket}/blobs/sha256/ab/cdef"
    assert not fs.exists(path)
    fs.pipe(path, DATA)
    assert fs.exists(path)
    assert fs.cat(path) == DATA
    assert fs.size(path) == len(DATA)
    assert fs.cat_file(path, start=100, end=110) == DATA[100:110]
    assert fs.ls(f"{bucket}/blobs/sha256/ab", detail=False) == [path]
    fs.rm(path)
    assert not fs.exists(path)
    with pytest.raises(FileNotFoundError):
        fs.cat(path)


def test_put_get_file(fs, bucket, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    fs.put_file(str(src), f"{bucket}/a/src.bin")
    dst = tmp_path / "dst.bin"
    fs.get_file(f"{bucket}/a/src.bin", str(dst))
    assert dst.read_bytes() == DATA


def test_listing_with_prefixes(server, fs, bucket):
    keys = ["refs/m1/latest/001-a", "refs/m1/latest/002-b", "refs/m1/v1/001-c", "refs/m10/latest/001-d", "blobs/x"]
    for key in keys:
        fs.pipe(f"{bucket}/{key}", key.encode())
    assert fs.ls(f"{bucket}/refs/m1/latest", detail=False) == [
        f"{bucket}/refs/m1/latest/001-a",
        f"{bucket}/refs/m1/latest/002-b",
    ]
    assert sorted(fs.ls(f"{bucket}/refs", detail=False)) == [f"{bucket}/refs/m1", f"{bucket}/refs/m10"]
    # find() is a recursive listing; "refs/m1/" must not match "refs/m10/"
    assert len(fs.find(f"{bucket}/refs/m1/")) == 3
    assert fs.glob(f"{bucket}/refs/m1/*/*") == sorted(
        [f"{bucket}/refs/m1/latest/001-a", f"{bucket}/refs/m1/latest/002-b", f"{bucket}/refs/m1/v1/001-c"]
    )
    # raw prefix listing with boto3 (what a "newest ref wins" lookup needs: sorted keys)
    listed = [o["Key"] for o in server.client().list_objects_v2(Bucket=bucket, Prefix="refs/m1/")["Contents"]]
    assert listed == ["refs/m1/latest/001-a", "refs/m1/latest/002-b", "refs/m1/v1/001-c"]


def test_listing_cache_is_per_instance(server, fs, bucket):
    """A long-lived s3fs instance caches ls(); writes by another client stay invisible to it."""
    fs.pipe(f"{bucket}/refs/n/latest/001", b"1")
    assert len(fs.ls(f"{bucket}/refs/n/latest")) == 1
    other = s3fs.S3FileSystem(**server.storage_options())
    other.pipe(f"{bucket}/refs/n/latest/002", b"2")
    assert len(fs.ls(f"{bucket}/refs/n/latest")) == 1  # stale
    assert len(fs.ls(f"{bucket}/refs/n/latest", refresh=True)) == 2
    fresh = s3fs.S3FileSystem(**server.storage_options(use_listings_cache=False))
    assert len(fresh.ls(f"{bucket}/refs/n/latest")) == 2


# ------------------------------------------------------------------------------ create-only writes


def test_create_only_pipe(fs, bucket):
    path = f"{bucket}/blobs/c1"
    fs.pipe(path, b"first", mode="create")  # sends If-None-Match: *
    with pytest.raises(FileExistsError):
        fs.pipe(path, b"second", mode="create")
    assert fs.cat(path) == b"first"
    fs.pipe(path, b"third")  # default mode="overwrite"
    assert fs.cat(path) == b"third"


def test_create_only_open_xb(fs, bucket):
    path = f"{bucket}/blobs/c2"
    with fs.open(path, "xb") as f:
        f.write(b"first")
    with pytest.raises(FileExistsError), fs.open(path, "xb") as f:
        f.write(b"second")
    assert fs.cat(path) == b"first"


def test_create_only_put_file(fs, bucket, tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(DATA)
    fs.put_file(str(src), f"{bucket}/blobs/c3", mode="create")
    with pytest.raises(FileExistsError):
        fs.put_file(str(src), f"{bucket}/blobs/c3", mode="create")


def test_conditional_put_if_match_with_boto3(server, bucket):
    """moto honours If-Match (compare-and-swap); s3fs has no API for it, boto3 does."""
    c = server.client()
    etag = c.put_object(Bucket=bucket, Key="refs/cas", Body=b"v1")["ETag"]
    c.put_object(Bucket=bucket, Key="refs/cas", Body=b"v2", IfMatch=etag)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        c.put_object(Bucket=bucket, Key="refs/cas", Body=b"v3", IfMatch=etag)
    assert ei.value.response["Error"]["Code"] == "PreconditionFailed"
    assert c.get_object(Bucket=bucket, Key="refs/cas")["Body"].read() == b"v2"


# ----------------------------------------------------------------------------------- through proxy


def test_proxy_passthrough_and_log(pfs, proxy, bucket):
    pfs.pipe(f"{bucket}/blobs/p", DATA)
    assert pfs.cat_file(f"{bucket}/blobs/p") == DATA
    assert pfs.ls(f"{bucket}/blobs", detail=False) == [f"{bucket}/blobs/p"]
    puts = proxy.requests("PUT", match="/blobs/p")
    assert len(puts) == 1 and puts[0].request_bytes == len(DATA)
    gets = proxy.requests("GET", match="/blobs/p")
    assert len(gets) == 1 and gets[0].status == 200 and gets[0].response_bytes == len(DATA)
    assert proxy.counters["PUT"] >= 1 and proxy.counters["GET"] >= 2 and not proxy.requests(fault="error")


def test_fault_targets_key_substring_only(pfs, proxy, bucket):
    pfs.pipe(f"{bucket}/blobs/k", DATA)
    pfs.pipe(f"{bucket}/refs/k", b"ref")
    fault = proxy.add_fault("flip", match="/blobs/", times=None)
    assert pfs.cat_file(f"{bucket}/refs/k") == b"ref"
    # a listing GET carries prefix=blobs/ in its query string; the match is on the path only
    assert pfs.ls(f"{bucket}/blobs", detail=False, refresh=True) == [f"{bucket}/blobs/k"]
    assert fault.hits == 0
    assert pfs.cat_file(f"{bucket}/blobs/k", start=0, end=100) != DATA[:100]
    assert fault.hits == 1


def test_transient_500_then_success(pfs, proxy, bucket):
    """botocore's default (legacy mode, 5 attempts) absorbs a few 500s; s3fs itself adds nothing here."""
    pfs.pipe(f"{bucket}/blobs/t", DATA)
    fault = proxy.add_fault("error", match="/blobs/t", times=2)
    assert pfs.cat_file(f"{bucket}/blobs/t") == DATA
    assert fault.hits == 2
    assert [r.status for r in proxy.requests("GET", match="/blobs/t")] == [500, 500, 200]


def test_persistent_500_gives_up_after_botocore_attempts(proxy, bucket):
    fs = s3fs.S3FileSystem(**proxy.storage_options(max_attempts=2, retry_mode="standard"))
    fs.pipe(f"{bucket}/blobs/p500", DATA)
    proxy.add_fault("error", match="/blobs/p500", times=None)
    with pytest.raises(OSError) as ei:
        fs.cat_file(f"{bucket}/blobs/p500")
    assert ei.value.errno == errno.EREMOTEIO  # s3fs maps InternalError -> EREMOTEIO, does not retry it
    assert len(proxy.requests("GET", match="/blobs/p500")) == 2


def test_slowdown_is_retried_by_both_layers(proxy, bucket):
    """503 SlowDown: botocore retries it, then s3fs retries the whole call (fs.retries times)."""
    fs = s3fs.S3FileSystem(**proxy.storage_options(max_attempts=1))
    fs.retries = 3
    fs.pipe(f"{bucket}/blobs/slow", DATA)
    proxy.add_fault("error", status=503, match="/blobs/slow", times=None)
    with pytest.raises(OSError) as ei:
        fs.cat_file(f"{bucket}/blobs/slow")
    assert ei.value.errno == errno.EBUSY
    assert len(proxy.requests("GET", match="/blobs/slow")) == 3  # 3 s3fs tries x 1 botocore attempt


def test_put_500_is_retried(pfs, proxy, bucket):
    proxy.add_fault("error", method="PUT", match="/blobs/w", times=1)
    pfs.pipe(f"{bucket}/blobs/w", DATA, mode="create")
    assert [r.status for r in proxy.requests("PUT", match="/blobs/w")] == [500, 200]
    assert pfs.cat_file(f"{bucket}/blobs/w") == DATA


def test_lost_put_response_then_create_only_retry_sees_its_own_object(pfs, proxy, bucket):
    """The server stored the object but the client saw a 500; botocore retries with If-None-Match: *
    and gets 412, so s3fs raises FileExistsError for a write that actually landed. Content-addressed
    blobs must treat FileExistsError as 'verify size + sha256 of what is there', not as a failure."""
    proxy.add_fault("error", method="PUT", match="/blobs/lost", forward=True)
    with pytest.raises(FileExistsError):
        pfs.pipe(f"{bucket}/blobs/lost", DATA, mode="create")
    assert [r.status for r in proxy.requests("PUT", match="/blobs/lost")] == [500, 412]
    assert pfs.cat_file(f"{bucket}/blobs/lost") == DATA


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_broken_body_once_is_retried_by_s3fs(pfs, proxy, bucket, kind):
    pfs.pipe(f"{bucket}/blobs/once-{kind}", DATA)
    proxy.add_fault(kind, match=f"/blobs/once-{kind}", times=1, after_bytes=1000)
    assert pfs.cat_file(f"{bucket}/blobs/once-{kind}") == DATA
    gets = proxy.requests("GET", match=f"/blobs/once-{kind}")
    assert [(g.fault, g.response_bytes) for g in gets] == [(kind, 1000), (None, len(DATA))]


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_broken_body_every_time_raises_payload_error(pfs, proxy, bucket, kind):
    path = f"{bucket}/blobs/bad-{kind}"
    pfs.pipe(path, DATA)
    proxy.add_fault(kind, match=f"/blobs/bad-{kind}", times=None, after_bytes=1000)
    with pytest.raises(aiohttp.ClientPayloadError) as ei:
        pfs.cat_file(path)
    assert "received 1000 of 10240 bytes" in str(ei.value)
    if kind == "reset":
        assert "ConnectionResetError" in str(ei.value)
    assert len(proxy.requests("GET", match=f"/blobs/bad-{kind}")) == pfs.retries  # botocore does not retry


def test_flipped_byte_full_get_caught_by_botocore_checksum(pfs, proxy, bucket):
    """botocore >= 1.36 stores CRC32 on PUT and validates it on a whole-object GET (moto keeps it)."""
    pfs.pipe(f"{bucket}/blobs/crc", DATA)
    proxy.add_fault("flip", match="/blobs/crc")
    with pytest.raises(botocore.exceptions.FlexibleChecksumError):
        pfs.cat_file(f"{bucket}/blobs/crc")
    assert pfs.cat_file(f"{bucket}/blobs/crc") == DATA  # next GET is clean


def _one_byte_off(got: bytes, want: bytes) -> bool:
    return len(got) == len(want) and sum(a != b for a, b in zip(got, want)) == 1


def test_flipped_byte_ranged_get_is_silent(pfs, proxy, bucket):
    """No checksum comes back for a partial range: wrong bytes, no error. deltahub's sha256 must catch it."""
    pfs.pipe(f"{bucket}/blobs/rng", DATA)
    proxy.add_fault("flip", match="/blobs/rng")
    got = pfs.cat_file(f"{bucket}/blobs/rng", start=0, end=len(DATA) - 1)
    assert _one_byte_off(got, DATA[:-1])
    assert proxy.requests("GET", match="/blobs/rng")[-1].fault == "flip"


def test_flipped_byte_full_get_is_silent_without_checksum_validation(proxy, bucket):
    fs = s3fs.S3FileSystem(**proxy.storage_options(config_kwargs={"response_checksum_validation": "when_required"}))
    fs.pipe(f"{bucket}/blobs/nocrc", DATA)
    proxy.add_fault("flip", match="/blobs/nocrc", offset=5)
    got = fs.cat_file(f"{bucket}/blobs/nocrc")
    assert _one_byte_off(got, DATA) and got[5] == DATA[5] ^ 0xFF


def test_ignored_range_returns_whole_object_silently(pfs, proxy, bucket):
    """A server that ignores Range (HF #3778's failure): s3fs returns the 200 body as-is, wrong length."""
    pfs.pipe(f"{bucket}/blobs/ir", DATA)
    proxy.add_fault("ignore_range", match="/blobs/ir")
    got = pfs.cat_file(f"{bucket}/blobs/ir", start=10, end=20)
    assert got == DATA  # asked for 10 bytes, got 10240: only a size check catches this


def test_proxy_forwards_chunked_request_body(server, proxy, bucket):
    import http.client

    host, port = proxy.endpoint_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    auth = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"
    try:
        body = iter([b"abc", b"defg"])
        conn.request("PUT", f"/{bucket}/chunked", body=body, headers={"Authorization": auth}, encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("Connection") == "close"
    assert server.client().get_object(Bucket=bucket, Key="chunked")["Body"].read() == b"abcdefg"
    assert proxy.requests("PUT", match="/chunked")[0].request_bytes == 7


def test_probability_and_delay(proxy, bucket):
    client = proxy.client(retries={"total_max_attempts": 1})
    client.put_object(Bucket=bucket, Key="blobs/pr", Body=b"x")
    fault = proxy.add_fault("error", match="/blobs/pr", times=None, probability=0.5)
    errors = 0
    for _ in range(20):
        try:
            client.get_object(Bucket=bucket, Key="blobs/pr")["Body"].read()
        except botocore.exceptions.ClientError as e:
            assert e.response["Error"]["Code"] == "InternalError"
            errors += 1
    assert 0 < errors < 20 and fault.hits == errors
    proxy.clear_faults()
    proxy.add_fault("delay", match="/blobs/pr", delay=0.2)
    t0 = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="blobs/pr")["Body"].read() == b"x"
    assert time.monotonic() - t0 >= 0.2


# --------------------------------------------------------------------------------- env and guard


def test_aws_env_lets_default_clients_reach_the_server(server, bucket):
    import boto3

    with aws_env(server.endpoint_url):
        boto3.session.Session().client("s3").put_object(Bucket=bucket, Key="env/k", Body=b"v")
        fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint, keys and region all from the env
        assert fs.cat(f"{bucket}/env/k") == b"v"


def test_guard_refuses_non_loopback(loopback_only):
    # `loopback_only` is the innermost guard (tests/conftest.py, around every test): it sees these first
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NonLoopbackError):
            s.connect(("192.0.2.1", 443))  # TEST-NET-1; never actually dialled
    finally:
        s.close()
    with pytest.raises(NonLoopbackError):
        socket.getaddrinfo("s3.amazonaws.com", 443)
    assert len(loopback_only) == 2
    loopback_only.clear()  # expected ones; the fixture's teardown asserts the rest is empty
