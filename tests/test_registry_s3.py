"""Object-storage registries against moto's S3 server on 127.0.0.1, with the real s3fs client.

Through the fault proxy (500/503, resets and truncated bodies, one flipped byte with status 200, ignored
Range) every pull either ends verified or raises a typed deltahub error, and no bad byte ever lands in
the local registry.
"""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from _registry_fixtures import cli, local_blobs_ok, make_artifact
from s3server import aws_env

from deltahub.errors import DeltaHubError, IntegrityError, RegistryError
from deltahub.registry import (
    Registry,
    backends,
)
from deltahub.registry.local import default_root


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTAHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTAHUB_LOAD_PLUGINS", "")
    monkeypatch.setenv("DELTAHUB_NO_PROGRESS", "1")
    monkeypatch.setattr(backends, "BACKOFF", 0.001)
    monkeypatch.setattr(backends, "ATTEMPTS", 3)


# guard, server, proxy and bucket: the shared S3 fixtures of tests/conftest.py


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    d = tmp_path_factory.mktemp("s3-arts")
    return {"a": make_artifact(d, "expert", 1), "b": make_artifact(d, "expert", 2), "c": make_artifact(d, "other", 3)}


def s3_registry(opts_from, bucket: str, **opts) -> Registry:
    """A registry on ``bucket`` through ``opts_from`` (server or proxy), with the client's own retries cut
    to one try (botocore and s3fs): deltahub's retries on top are what is under test."""
    reg = Registry(f"s3://{bucket}/deltas", storage_options=opts_from.storage_options(max_attempts=1, **opts))
    reg._remote.store.backend.fs.retries = 1
    return reg


def test_s3_push_ls_pull_verify_gc(server, bucket, arts, tmp_path):
    reg = s3_registry(server, bucket)
    url = f"s3://{bucket}/deltas"
    info = reg.push(arts["a"])
    reg.push(arts["c"], tag="v1")
    assert info.url == url and {r.ref for r in reg.ls()} == {"expert:latest", "other:v1"}
    keys = {o["Key"] for o in server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"deltas/blobs/sha256/{arts['a'].id}" in keys
    assert any(k.startswith("deltas/refs/expert/latest/") for k in keys)
    assert not any(k.startswith("deltas/intents/") for k in keys)  # removed once the push completed
    art = reg.pull("expert", out=tmp_path / "out")
    assert art.id == arts["a"].id and Registry().resolve("expert").id == arts["a"].id
    assert reg.pull(f"{url}/other:v1").id == arts["c"].id
    assert reg.verify() == [] and Registry().verify() == []
    reg.push(arts["b"])
    assert reg.gc(grace_seconds=3600).deleted_blobs == []
    report = reg.gc(grace_seconds=0)
    a_blobs = {arts["a"].id, *(f.sha256 for f in arts["a"].manifest.files)}
    assert {p.rsplit("/", 1)[-1] for p in report.deleted_blobs} == a_blobs
    assert reg.verify() == [] and reg.resolve("expert").id == arts["b"].id


def test_s3_second_push_and_pull_transfer_nothing(proxy, bucket, arts):
    reg = s3_registry(proxy, bucket)
    reg.push(arts["a"])
    reg.pull("expert")
    proxy.clear_log()
    reg.push(arts["a"])
    reg.pull("expert")
    assert proxy.requests("PUT", match="/blobs/") == [] and proxy.requests("PUT", match="/refs/") == []
    payloads = [f"/blobs/sha256/{f.sha256}" for f in arts["a"].manifest.files]
    assert not [r for r in proxy.requests("GET") if any(p in r.path for p in payloads)]


def test_s3_missing_bucket_is_a_typed_error(server):
    reg = s3_registry(server, f"nope-{uuid.uuid4().hex[:8]}")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.ls()


FAULTS = [
    ("error", {"status": 500}), ("error", {"status": 503}), ("reset", {"after_bytes": 64}),
    ("truncate", {"after_bytes": 64}), ("flip", {}), ("ignore_range", {}),
]


@pytest.mark.parametrize("kind,kw", FAULTS, ids=[f"{k}-{kw.get('status', '')}" for k, kw in FAULTS])
@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
def test_s3_pull_through_faults_is_verified_or_typed(server, proxy, bucket, arts, kind, kw, times):
    s3_registry(server, bucket).push(arts["a"])
    reg = s3_registry(proxy, bucket)
    proxy.add_fault(kind, match="/blobs/", times=times, **kw)
    try:
        art = reg.pull("expert")
    except DeltaHubError:
        assert times is None  # a one-off fault is always absorbed by a retry
        assert Registry().ls() == []
    else:
        assert art.id == arts["a"].id
        art.verify_files()
    assert local_blobs_ok(default_root())
    tmp = default_root() / "tmp"
    assert not tmp.is_dir() or not [p for p in tmp.rglob("*") if p.is_file()]


TIMEOUT = {"config_kwargs": {"retries": {"total_max_attempts": 1}, "read_timeout": 1, "connect_timeout": 1}}


@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
def test_s3_pull_through_a_stall_mid_body_is_verified_or_typed(server, proxy, bucket, arts, times):
    """The server goes silent half-way through a blob: the read timeout fires, a retry heals a one-off."""
    import time

    s3_registry(server, bucket).push(arts["a"])
    reg = s3_registry(proxy, bucket, **TIMEOUT)
    fault = proxy.add_fault("stall", match="/blobs/", times=times, delay=5.0)
    t0 = time.monotonic()
    try:
        art = reg.pull("expert")
    except DeltaHubError:
        assert times is None and Registry().ls() == []
    else:
        assert times == 1 and art.id == arts["a"].id
        art.verify_files()
    assert fault.hits >= 1
    assert time.monotonic() - t0 < 5 * backends.ATTEMPTS + 10  # bounded by the read timeout, never a hang
    assert local_blobs_ok(default_root())


def test_s3_pull_over_a_slow_drip_is_complete(server, proxy, bucket, arts):
    """Every blob arrives 64 bytes per 2 ms: slow, but each byte is the stored one."""
    s3_registry(server, bucket).push(arts["a"])
    reg = s3_registry(proxy, bucket, **TIMEOUT)
    fault = proxy.add_fault("drip", match="/blobs/", times=None, after_bytes=64, delay=0.002)
    art = reg.pull("expert")
    assert fault.hits >= 2 and art.id == arts["a"].id
    art.verify_files()
    assert local_blobs_ok(default_root())


def test_s3_push_whose_answers_stall_is_idempotent(server, proxy, bucket, arts):
    """A PUT stored upstream whose response never comes: the retry re-sends, the registry ends the same."""
    reg = s3_registry(proxy, bucket, **TIMEOUT)
    proxy.add_fault("delay", method="PUT", match="/blobs/", times=1, delay=3.0)
    info = reg.push(arts["a"])
    assert info.id == arts["a"].id
    assert s3_registry(server, bucket).verify() == []
    assert [r.id for r in s3_registry(server, bucket).ls()] == [arts["a"].id]


def test_s3_silent_flip_caught_by_sha256(proxy, bucket, arts, server):
    """Without botocore's response checksums only deltahub's sha256 stands between a flipped byte and the store."""
    s3_registry(server, bucket).push(arts["a"])
    reg = s3_registry(proxy, bucket, config_kwargs={"response_checksum_validation": "when_required"})
    payload = arts["a"].manifest.files[0].sha256
    fault = proxy.add_fault("flip", match=f"/blobs/sha256/{payload}", times=None)
    with pytest.raises(IntegrityError, match="nothing was stored"):
        reg.pull("expert")
    assert fault.hits >= 2 and local_blobs_ok(default_root()) and Registry().ls() == []
    proxy.clear_faults()
    once = proxy.add_fault("flip", match=f"/blobs/sha256/{payload}", times=1)
    assert reg.pull("expert").id == arts["a"].id and once.hits == 1


def test_s3_push_survives_put_errors_and_lost_responses(proxy, bucket, arts):
    reg = s3_registry(proxy, bucket)
    proxy.add_fault("error", method="PUT", match="/blobs/", times=1)
    proxy.add_fault("error", method="PUT", match="/blobs/", times=1, forward=True)  # stored, but the 200 was lost
    reg.push(arts["a"])
    proxy.clear_faults()
    assert reg.verify() == [] and reg.resolve("expert").id == arts["a"].id


def test_s3_corrupt_object_at_rest_found_by_verify(server, bucket, arts):
    reg = s3_registry(server, bucket)
    reg.push(arts["a"])
    payload = arts["a"].manifest.files[0]
    key = f"deltas/blobs/sha256/{payload.sha256}"
    body = bytearray(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    body[10] ^= 1
    server.client().put_object(Bucket=bucket, Key=key, Body=bytes(body))
    assert any("corrupted" in p for p in reg.verify())
    with pytest.raises(IntegrityError):
        reg.pull("expert")
    assert local_blobs_ok(default_root())


def test_s3_cli_with_env_credentials(server, bucket, arts, tmp_path):
    url = f"s3://{bucket}/team"
    with aws_env(server.endpoint_url):
        for args in (["push", str(arts["a"].folder), "--to", url], ["ls", url], ["verify", "--registry", url],
                     ["pull", f"{url}/expert", "-o", str(tmp_path / "x")], ["gc", "--registry", url, "--dry-run"]):
            res = cli(args)
            assert res.exit_code == 0, (args, res.output)
        assert arts["a"].id[:12] in cli(["ls", url]).output
        res = cli(["pull", f"s3://{bucket}-missing/team/expert"])
        assert res.exit_code == 1 and res.output.startswith("Error: ") and "does not exist" in res.output
