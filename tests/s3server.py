"""An S3 server on 127.0.0.1 for tests, and a fault-injecting proxy to put in front of it.

Nothing here reaches past loopback. Typical use::

    with run_s3_server() as server:
        server.make_bucket("reg")
        fs = s3fs.S3FileSystem(**server.storage_options())
        fs.pipe("reg/blobs/ab", b"data")

    with run_faulty_s3() as (server, proxy):
        server.make_bucket("reg")
        fs = s3fs.S3FileSystem(**proxy.storage_options())
        proxy.add_fault("flip", match="/blobs/")      # next blob GET gets one byte flipped
        ...

    with aws_env(server.endpoint_url), loopback_only() as guard:
        ...                                            # code that builds its own clients from the env
    assert not guard.attempts

moto's backends are process-global: every moto server (and every ``mock_aws``) in one process sees
the same buckets. ``run_s3_server`` resets that state on entry and exit; use distinct bucket names if
two servers must live at once.

The proxy speaks HTTP/1.1 but forces ``Connection: close`` on every exchange: it reads the whole
request (Content-Length or chunked), forwards it upstream, reads the whole upstream response, then
sends it back with the chosen fault applied.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import os
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

HOST = "127.0.0.1"
REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"

# Variables that could send botocore/aiobotocore somewhere other than our endpoint, or make it
# look up credentials over the network (IMDS, container credentials, web identity, SSO).
UNSET_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_CA_BUNDLE",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_S3_ENDPOINT",
    "FSSPEC_S3",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def s3_env(endpoint_url: str) -> dict[str, str]:
    """Environment variables for code that builds its own AWS clients (set these, unset UNSET_ENV)."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@contextlib.contextmanager
def aws_env(endpoint_url: str) -> Iterator[dict[str, str]]:
    """Apply ``s3_env(endpoint_url)`` to os.environ (and clear UNSET_ENV); restore on exit."""
    env = s3_env(endpoint_url)
    saved = {k: os.environ.get(k) for k in (*env, *UNSET_ENV)}
    try:
        for k in UNSET_ENV:
            os.environ.pop(k, None)
        os.environ.update(env)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def storage_options(
    endpoint_url: str,
    *,
    max_attempts: int | None = None,
    retry_mode: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """s3fs ``storage_options`` for ``endpoint_url``: fake credentials, fixed region, no instance cache.

    ``max_attempts`` (total tries, the first included; 1 = no botocore retry) and ``retry_mode``
    ("legacy", "standard", "adaptive") set botocore's retry config. botocore's default is "legacy"
    with 5 tries. Note botocore's own ``Config(retries={"max_attempts": n})`` counts *retries*
    (n + 1 tries); this helper writes ``total_max_attempts`` to avoid that trap. ``extra`` is merged
    in last (a caller's own ``config_kwargs`` replaces ours).
    """
    opts: dict[str, Any] = {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
        "skip_instance_cache": True,
    }
    retries: dict[str, Any] = {}
    if max_attempts is not None:
        retries["total_max_attempts"] = max_attempts
    if retry_mode is not None:
        retries["mode"] = retry_mode
    if retries:
        opts["config_kwargs"] = {"retries": retries}
    opts.update(extra)
    return opts


def boto3_client(endpoint_url: str, **config: Any):
    """A boto3 S3 client for ``endpoint_url`` with fake credentials (``config``: botocore Config kwargs)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(**config) if config else None,
    )


def make_bucket(name: str, endpoint_url: str) -> str:
    """Create bucket ``name`` on the server at ``endpoint_url`` (boto3); return the name."""
    boto3_client(endpoint_url).create_bucket(Bucket=name)
    return name


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- moto


@dataclass
class S3Server:
    """A running moto server: ``endpoint_url`` is ``http://127.0.0.1:<port>``."""

    host: str
    port: int
    _client: Any = field(default=None, repr=False, compare=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def storage_options(self, **kw: Any) -> dict[str, Any]:
        return storage_options(self.endpoint_url, **kw)

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint_url)

    def client(self, **config: Any):
        """A boto3 S3 client for this server (cached when no ``config`` is given)."""
        if config:
            return boto3_client(self.endpoint_url, **config)
        if self._client is None:
            self._client = boto3_client(self.endpoint_url)
        return self._client

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        """Drop every bucket and object (moto's state is process-global)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)  # no proxy env lookups
        try:
            conn.request("POST", "/moto-api/reset", body=b"")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"moto reset failed: HTTP {resp.status}")
        finally:
            conn.close()


@contextlib.contextmanager
def run_s3_server(*, reset: bool = True, quiet: bool = True) -> Iterator[S3Server]:
    """Start moto's ThreadedMotoServer on 127.0.0.1 on a free port; yield an S3Server; stop it.

    ``reset``: wipe moto's (process-global) state on entry and exit. ``quiet``: hide werkzeug's
    per-request log lines while the server runs.
    """
    from moto.server import ThreadedMotoServer

    wlog = logging.getLogger("werkzeug")
    old_level = wlog.level
    if quiet:
        wlog.setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        server = S3Server(host, port)
        if reset:
            server.reset()
        yield server
        if reset:
            server.reset()
    finally:
        moto.stop()
        wlog.setLevel(old_level)


# --------------------------------------------------------------------------------------------- proxy

FAULT_KINDS = ("error", "reset", "truncate", "flip", "ignore_range", "delay", "stall", "drip")
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
_ERROR_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class Fault:
    """One switchable fault; see ``FaultProxy.add_fault``."""

    kind: str
    match: str = ""
    method: str | None = "GET"
    times: int | None = 1
    status: int = 500
    code: str | None = None
    forward: bool = False
    after_bytes: int | None = None
    offset: int | None = None
    delay: float = 0.0
    probability: float = 1.0
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, key_path: str) -> bool:
        if self.method is not None and method != self.method.upper():
            return False
        return self.match in key_path


@dataclass
class RequestRecord:
    method: str
    path: str  # URL-decoded path, no query
    query: str
    status: int
    fault: str | None
    request_bytes: int
    response_bytes: int  # body bytes actually sent to the client


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of ``upstream_url`` that can break responses on demand.

    Faults are tried in the order they were added; the first that matches the request's method and
    whose ``match`` is a substring of the URL-decoded path (``/bucket/key``, query excluded) fires and
    counts a hit. Body faults (reset, truncate, flip) only fire on 200/206 responses with a body.
    """

    def __init__(self, upstream_url: str, *, seed: int = 0, host: str = HOST, port: int = 0) -> None:
        u = urllib.parse.urlsplit(upstream_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream = (u.hostname, u.port or 80)
        self.faults: list[Fault] = []
        self.log: list[RequestRecord] = []
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.stopping = threading.Event()  # ends stalls early when the proxy stops
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # lifecycle
    @property
    def endpoint_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def storage_options(self, **kw: Any) -> dict[str, Any]:
        return storage_options(self.endpoint_url, **kw)

    def client(self, **config: Any):
        return boto3_client(self.endpoint_url, **config)

    # faults
    def add_fault(
        self,
        kind: str,
        *,
        match: str = "",
        method: str | None = "GET",
        times: int | None = 1,
        status: int = 500,
        code: str | None = None,
        forward: bool = False,
        after_bytes: int | None = None,
        offset: int | None = None,
        delay: float = 0.0,
        probability: float = 1.0,
    ) -> Fault:
        """Arm a fault and return it (its ``hits`` counts how often it fired).

        kind:
          ``error``        answer ``status`` (500 -> InternalError, 503 -> SlowDown, or ``code``) with an
                           S3 XML error body. ``forward=False``: the request never reaches the server;
                           ``forward=True``: the server applies it, the client still sees the error
                           (a PUT that succeeded but whose response was lost).
          ``reset``        send headers and ``after_bytes`` of the body (default half), then RST.
          ``truncate``     send the full Content-Length header but only ``after_bytes`` bytes, then FIN.
          ``flip``         200 with correct length, byte ``offset`` (default the middle) XOR 0xFF.
          ``ignore_range`` drop the request's Range header: the server answers 200 with the whole body.
          ``delay``        sleep ``delay`` seconds before answering (combine with the ``delay`` of any kind).
          ``stall``        send headers and ``after_bytes`` of the body (default half), then go silent for
                           ``delay`` seconds with the connection open (a read timeout mid-body), then close.
          ``drip``         send the whole body ``after_bytes`` bytes (default 64) at a time, ``delay``
                           seconds apart (a slow link).
        match: substring of the URL-decoded ``/bucket/key`` path ("" = any).
        method: "GET", "PUT", ... or None for any method.
        times: how many requests it hits (None = every matching request).
        probability: chance it fires on a matching request (seeded RNG of the proxy).
        """
        fault = Fault(
            kind=kind,
            match=match,
            method=method,
            times=times,
            status=status,
            code=code,
            forward=forward,
            after_bytes=after_bytes,
            offset=offset,
            delay=delay,
            probability=probability,
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()
            self.counters.clear()

    def requests(self, method: str | None = None, match: str = "", fault: str | None = None) -> list[RequestRecord]:
        """Logged requests filtered by method, path substring and fault kind."""
        with self._lock:
            return [
                r
                for r in self.log
                if (method is None or r.method == method.upper())
                and match in r.path
                and (fault is None or r.fault == fault)
            ]

    def _pick(self, method: str, key_path: str, *, body_fault_ok: bool | None) -> Fault | None:
        """First armed fault for this request. body_fault_ok=None: choose among pre-upstream kinds."""
        pre = ("error", "ignore_range", "delay")
        with self._lock:
            for f in self.faults:
                if f.exhausted or not f.matches(method, key_path):
                    continue
                if body_fault_ok is None:
                    if f.kind not in pre:
                        continue
                elif f.kind in pre or not body_fault_ok:
                    continue
                if f.probability < 1.0 and self._rng.random() >= f.probability:
                    continue
                f.hits += 1
                return f
        return None

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.log.append(rec)
            self.counters[rec.method] += 1
            self.counters[f"status:{rec.status}"] += 1
            if rec.fault:
                self.counters[f"fault:{rec.fault}"] += 1


def _s3_error_body(code: str, status: int) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected fault (HTTP {status})</Message>"
        "<RequestId>fault-proxy</RequestId><HostId>fault-proxy</HostId></Error>"
    ).encode()


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # so we may send Content-Length and cut the body short

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        def do_GET(self) -> None:
            self._proxy()

        do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET

        def _read_request_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(parts)
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _proxy(self) -> None:
            self.close_connection = True
            method = self.command
            split = urllib.parse.urlsplit(self.path)
            key_path = urllib.parse.unquote(split.path)
            body = self._read_request_body()

            fault = proxy._pick(method, key_path, body_fault_ok=None)
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            drop_range = fault is not None and fault.kind == "ignore_range"

            if fault is not None and fault.kind == "error" and not fault.forward:
                self._send_error(fault, method, key_path, split.query, len(body))
                return

            status, reason, headers, resp_body = self._forward(method, body, drop_range)

            if fault is not None and fault.kind == "error":  # forward=True: applied upstream, answer lost
                self._send_error(fault, method, key_path, split.query, len(body))
                return

            body_ok = status in (200, 206) and bool(resp_body) and method != "HEAD"
            bfault = proxy._pick(method, key_path, body_fault_ok=body_ok)
            if bfault is not None and bfault.delay and bfault.kind not in ("stall", "drip"):
                time.sleep(bfault.delay)
            kind = bfault.kind if bfault is not None else (fault.kind if fault is not None else None)

            n = len(resp_body)
            cut = n
            if bfault is not None and bfault.kind in ("reset", "truncate", "stall"):
                cut = bfault.after_bytes if bfault.after_bytes is not None else n // 2
                cut = max(0, min(cut, n - 1))
            if bfault is not None and bfault.kind == "flip":
                i = bfault.offset if bfault.offset is not None else n // 2
                i = max(0, min(i, n - 1))
                flipped = bytearray(resp_body)
                flipped[i] ^= 0xFF
                resp_body = bytes(flipped)

            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() in _HOP or (k.lower() == "content-length" and method != "HEAD"):
                    continue
                self.send_header(k, v)
            if method != "HEAD" and status not in (204, 304) and status >= 200:
                self.send_header("Content-Length", str(n))
            self.send_header("Connection", "close")
            sent = 0 if method == "HEAD" else cut
            # Record before the client can see the response, so a test that checks the log right
            # after its call returns (or raises) never races this thread.
            proxy._record(RequestRecord(method, key_path, split.query, status, kind, len(body), sent))
            self.end_headers()
            try:
                if method != "HEAD" and bfault is not None and bfault.kind == "drip":
                    step = bfault.after_bytes or 64
                    for i in range(0, n, step):
                        self.wfile.write(resp_body[i:i + step])
                        self.wfile.flush()
                        time.sleep(bfault.delay)
                elif method != "HEAD":
                    self.wfile.write(resp_body[:cut])
                    self.wfile.flush()
                if bfault is not None and bfault.kind == "stall":
                    proxy.stopping.wait(bfault.delay)  # silent, connection open: only the client's read timeout ends this
            except OSError:
                pass
            if bfault is not None and bfault.kind == "reset":
                self._reset_connection()

        def _forward(self, method: str, body: bytes, drop_range: bool):
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    kl = k.lower()
                    if kl in _HOP or kl == "content-length" or (drop_range and kl == "range"):
                        continue
                    conn.putheader(k, v)
                if body or method in ("PUT", "POST", "PATCH"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.putheader("Connection", "close")
                conn.endheaders(body if body else None)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            finally:
                conn.close()

        def _send_error(self, fault: Fault, method: str, key_path: str, query: str, req_len: int) -> None:
            code = fault.code or _ERROR_CODES.get(fault.status, "InternalError")
            payload = b"" if method == "HEAD" else _s3_error_body(code, fault.status)
            self.send_response_only(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("x-amz-request-id", "fault-proxy")
            self.send_header("Connection", "close")
            proxy._record(RequestRecord(method, key_path, query, fault.status, "error", req_len, len(payload)))
            self.end_headers()
            try:
                self.wfile.write(payload)
            except OSError:
                pass

        def _reset_connection(self) -> None:
            # SO_LINGER(on, 0) + close sends RST instead of FIN. rfile holds a reference to the socket,
            # so close it too or the descriptor (and the connection) stays open.
            sock = self.connection
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.rfile.close()
            sock.close()

    return Handler


@contextlib.contextmanager
def run_fault_proxy(upstream_url: str, *, seed: int = 0) -> Iterator[FaultProxy]:
    """Start a FaultProxy on a free 127.0.0.1 port in front of ``upstream_url``; stop it on exit."""
    proxy = FaultProxy(upstream_url, seed=seed).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def run_faulty_s3(*, seed: int = 0) -> Iterator[tuple[S3Server, FaultProxy]]:
    """A moto server and a FaultProxy in front of it: point clients at ``proxy.endpoint_url``."""
    with run_s3_server() as server, run_fault_proxy(server.endpoint_url, seed=seed) as proxy:
        yield server, proxy


# --------------------------------------------------------------------------------------------- guard


class NonLoopbackError(RuntimeError):
    """Raised by ``loopback_only`` when code tries to resolve or reach a non-loopback host."""


@dataclass
class LoopbackGuard:
    attempts: list[str] = field(default_factory=list)


def _is_loopback(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host)
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def loopback_only() -> Iterator[LoopbackGuard]:
    """Patch socket connect/connect_ex/getaddrinfo so any non-loopback host raises NonLoopbackError.

    Every refused attempt is also recorded in ``guard.attempts`` (clients such as botocore's IMDS
    fetcher swallow errors), so assert ``not guard.attempts`` at the end.
    """
    guard = LoopbackGuard()
    orig_connect = socket.socket.connect
    orig_connect_ex = socket.socket.connect_ex
    orig_getaddrinfo = socket.getaddrinfo

    def check(what: str, address: Any, family: int | None = None) -> None:
        if family == getattr(socket, "AF_UNIX", object()):
            return
        host = address[0] if isinstance(address, tuple) else address
        if not _is_loopback(host):
            guard.attempts.append(f"{what} {address!r}")
            raise NonLoopbackError(f"test tried to reach non-loopback address {address!r} ({what})")

    def connect(self, address):
        check("connect", address, self.family)
        return orig_connect(self, address)

    def connect_ex(self, address):
        check("connect_ex", address, self.family)
        return orig_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        check("getaddrinfo", host)
        return orig_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    try:
        yield guard
    finally:
        socket.socket.connect = orig_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = orig_connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = orig_getaddrinfo  # type: ignore[assignment]
