"""Shared fixtures: every test gets its own DELTAHUB_HOME and sees only built-in plugins."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("DELTAHUB_LOAD_PLUGINS", "")  # installed third-party codecs must not reach the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing reaches the internet; Hub tests use a local server
os.environ.setdefault("DELTAHUB_NO_PROGRESS", "1")
# Triton kernels run in the interpreter on CPU-only machines; this must be set before triton is imported
# (on a machine with CUDA the same tests run the compiled kernels on the GPU instead).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
# one compiled copy of the CPU kernels for the whole run (each test has its own DELTAHUB_HOME)
os.environ.setdefault("DELTAHUB_KERNEL_CACHE", os.path.join(tempfile.gettempdir(), f"deltahub-kernels-{os.getuid()}"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAHUB_HOME", str(tmp_path_factory.mktemp("deltahub_home")))
    monkeypatch.setenv("DELTAHUB_LOAD_PLUGINS", "")


@pytest.fixture(autouse=True)
def loopback_only():  # noqa: ANN201
    """Every test: refuse (and record) any connection or DNS lookup that is not loopback.

    Yields the list of refused attempts; a test that provokes one on purpose clears it.
    """
    from s3server import loopback_only as guard_sockets

    with guard_sockets() as guard:
        yield guard.attempts
    assert guard.attempts == [], f"a test tried to leave the machine: {guard.attempts}"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path):  # noqa: ANN201
    """A Hub-API server on 127.0.0.1 (tests/hubserver.py) that the real huggingface_hub client talks to."""
    from hubserver import checked, hub_server_fixture

    yield from checked(hub_server_fixture(monkeypatch, tmp_path))


@pytest.fixture
def auth_hub(monkeypatch: pytest.MonkeyPatch, tmp_path):  # noqa: ANN201
    """The same server, with private repos and a token (``hubserver.TEST_TOKEN``, set as HF_TOKEN)."""
    from hubserver import TEST_TOKEN, checked, hub_server_fixture

    yield from checked(hub_server_fixture(monkeypatch, tmp_path, token=TEST_TOKEN))


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


# ---- S3 (tests/s3server.py): one moto server and one fault proxy per test module, a fresh bucket per test
@pytest.fixture(scope="module")
def guard():  # noqa: ANN201
    from s3server import loopback_only as guard_sockets

    with guard_sockets() as g:
        yield g
    assert not g.attempts, f"non-loopback network access attempted: {g.attempts}"


@pytest.fixture(scope="module")
def server(guard):  # noqa: ANN201
    """moto's S3 server on 127.0.0.1; aws_env: fake keys, no IMDS, no ~/.aws config or AWS_* overrides."""
    from s3server import aws_env, run_s3_server

    with run_s3_server() as s, aws_env(s.endpoint_url):
        yield s


@pytest.fixture(scope="module")
def proxy(server):  # noqa: ANN201
    """The fault-injecting proxy in front of ``server`` (``proxy.add_fault(...)``)."""
    from s3server import run_fault_proxy

    with run_fault_proxy(server.endpoint_url, seed=0) as p:
        yield p


@pytest.fixture
def bucket(server, proxy):  # noqa: ANN201
    """A new empty bucket; the proxy's faults and log are cleared before and after."""
    import uuid

    proxy.clear_faults()
    proxy.clear_log()
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.make_bucket(name)
    yield name
    proxy.clear_faults()
