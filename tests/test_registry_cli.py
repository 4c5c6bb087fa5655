"""The registry CLI verbs through the real entry point: exit codes, one-line errors, --help examples."""

from __future__ import annotations

import json
import uuid

import pytest

from deltahub.registry.local import default_root

from _registry_fixtures import blob_path, cli, flip_byte, make_artifact


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTAHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTAHUB_LOAD_PLUGINS", "")
    monkeypatch.setenv("DELTAHUB_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("cli-arts"), "expert", 1)


@pytest.fixture(scope="module")
def art2(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("cli-arts2"), "expert", 2)


def ok(args: list[str]) -> str:
    res = cli(args)
    assert res.exit_code == 0, f"{args}: {res.output}"
    return res.output


def fails(args: list[str], code: int = 1) -> str:
    res = cli(args)
    assert res.exit_code == code, f"{args}: exit {res.exit_code}: {res.output}"
    assert "Traceback" not in res.output
    return res.output


def test_push_ls_verify_pull_gc_local(art, tmp_path):
    assert "pushed expert:latest" in ok(["push", str(art.folder)])
    assert "pushed expert:v2" in ok(["push", str(art.folder), "--tag", "v2"])
    table = ok(["ls"]).splitlines()
    assert table[0].split()[:3] == ["NAME", "TAG", "ID"] and len(table) == 3
    assert art.id[:12] in table[1] and "dense" in table[1]
    rows = json.loads(ok(["ls", "--json"]))
    assert {(r["name"], r["tag"], r["id"]) for r in rows} == {("expert", "latest", art.id), ("expert", "v2", art.id)}
    assert rows[0]["codec"] == "dense" and rows[0]["bits_per_param"] == 32.0 and "created" in rows[0]
    assert "OK" in ok(["verify"]) and "OK" in ok(["verify", "expert:v2"])
    assert "pulled expert" in ok(["pull", "expert", "-o", str(tmp_path / "copy")])
    assert (tmp_path / "copy" / "deltahub.json").is_file()
    assert "would delete 0 blobs" in ok(["gc", "--dry-run"])
    assert "deleted 0 blobs" in ok(["gc", "--grace", "0"])


def test_remote_round_trip(art, art2, tmp_path):
    url = f"memory://cli-{uuid.uuid4().hex[:8]}"
    ok(["push", str(art.folder), "--to", url])
    ok(["push", str(art2.folder), "--to", url])  # moves expert:latest there
    assert art2.id[:12] in ok(["ls", url])
    out = ok(["pull", f"{url}/expert", "-o", str(tmp_path / "out"), "--with-base"])
    assert "pulled expert" in out and "base" in out
    assert "OK" in ok(["verify", "--registry", url])
    assert "deleted 2 blobs" in ok(["gc", "--registry", url, "--grace", "0"])  # art's payload + manifest
    ok(["push", "expert", "--to", (tmp_path / "reg").as_uri(), "--tag", "copied"])  # local ref -> file:// registry
    assert "copied" in ok(["ls", (tmp_path / "reg").as_uri()])


def test_user_errors_are_one_line(art, tmp_path):
    for args in (["pull", "nope"], ["push", str(tmp_path / "missing")], ["push", str(art.folder), "--name", "../x"],
                 ["push", str(art.folder), "--tag", "a b"], ["pull", "s3://onlybucket"], ["ls", "nosuch://x/y"],
                 ["verify", "nope"], ["gc", "--registry", "hf-nope://x"]):
        out = fails(args)
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, out)


def test_verify_reports_corruption_and_exits_1(art):
    ok(["push", str(art.folder)])
    flip_byte(blob_path(default_root(), art.manifest.files[0].sha256))
    out = fails(["verify"])
    assert "corrupted" in out and out.strip().splitlines()[-1].startswith("Error: ")


def test_usage_errors_exit_2():
    fails(["push"], code=2)
    fails(["pull"], code=2)
    fails(["gc", "--grace", "-1"], code=2)
    fails(["ls", "--bogus"], code=2)


@pytest.mark.parametrize("verb", ["push", "pull", "ls", "verify", "gc"])
def test_help_has_examples(verb):
    out = ok([verb, "--help"])
    assert "Examples:" in out and f"deltahub {verb}" in out
