"""A real S3 endpoint for tests: moto's standalone server on a free localhost port.

``s3_server`` (module scope) starts moto's server (its werkzeug app, in a thread of this process),
creates a bucket, and points every S3 client at it through the environment:

* ``FSSPEC_S3_ENDPOINT_URL`` / ``FSSPEC_S3_KEY`` / ``FSSPEC_S3_SECRET``: fsspec turns
  ``FSSPEC_<PROTOCOL>_<KWARG>`` into default keyword arguments of every ``s3://`` filesystem, so
  ``fsspec.core.url_to_fs("s3://...")`` needs no ``storage_options``. fsspec reads these variables
  once, at import, so this process's ``fsspec.config.conf`` is patched too;
* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION`` for botocore itself,
  with the user's AWS config files and profile hidden and the EC2 metadata lookup off.

Subprocesses (the CLI as a user runs it) inherit the environment, and so do the Ray workers that a
local ``ray.init`` in such a process starts. A Ray instance started BEFORE the fixture does not see
it: start Ray inside the tests that need it, or in a subprocess.

Every request the server answers is recorded as an :class:`S3Request` (operation name, key), so a
test can say which S3 operations a command made (``server.ops(...)``). Everything is undone when the
module's tests are done: environment, fsspec's config and instance cache, the server.

Typical use, e.g. a test of a command that checks and repairs a dataset::

    from dataset_factory import make_dataset
    from object_store import s3_server  # noqa: F401  (the fixture)

    def test_verify_repairs_on_s3(s3_server):
        url = s3_server.url("v")                                   # s3://<bucket>/v
        make_dataset(url, num_samples=4, steps=2, shard_size=2)    # written here, through s3fs
        s3_server.fs().rm_file(f"{s3_server.bucket}/v/index/shard-000001.parquet")
        since = len(s3_server.requests)
        res = run_subprocess("verify", url, "--repair")            # the child finds the endpoint
        assert res.returncode == 0, res.stderr
        assert "CopyObject" not in s3_server.ops("v/", since=since)

Other endpoints or missing credentials: ``with s3_environment({**s3_server.env, "FSSPEC_S3_KEY": None})``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import parse_qs, unquote

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

KEY, SECRET, REGION = "testing-key", "testing-secret", "us-east-1"


@dataclass(frozen=True)
class S3Request:
    """One request the server answered: the S3 operation (``PutObject``, ``CopyObject``, ...), the
    bucket, the object key (``""`` for bucket-level requests) and the HTTP status."""

    op: str
    bucket: str
    key: str
    status: int


def _operation(method: str, key: str, query: dict, headers: dict) -> str:
    """The S3 operation name of a path-style request (the subset arcflow's clients use)."""
    if method == "PUT":
        if "x-amz-copy-source" in headers:
            return "UploadPartCopy" if "partNumber" in query else "CopyObject"
        if "partNumber" in query:
            return "UploadPart"
        return "PutObject" if key else "CreateBucket"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        if "delete" in query:
            return "DeleteObjects"
        return "POST"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteObject" if key else "DeleteBucket"
    if method == "HEAD":
        return "HeadObject" if key else "HeadBucket"
    if method == "GET":
        if not key:
            if "location" in query:
                return "GetBucketLocation"
            return "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"
        return "GetObject"
    return method


class _Recorder:
    """WSGI middleware around moto's app that notes every S3 request, and runs one request at a
    time: moto's S3 backend has no locks of its own, and a listing racing a write in another
    server thread can fail with a 500 that no real S3 would send."""

    def __init__(self, app) -> None:
        self.app = app
        self.log: list[S3Request] = []
        self.lock = threading.Lock()
        self.serial = threading.Lock()

    def __call__(self, environ, start_response):
        path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
        if path.startswith("moto-api"):
            return self.app(environ, start_response)
        bucket, _, key = path.partition("/")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        headers = {k[5:].lower().replace("_", "-"): v for k, v in environ.items() if k.startswith("HTTP_")}
        op = _operation(environ.get("REQUEST_METHOD", ""), key, query, headers)

        def record(status, response_headers, exc_info=None):
            with self.lock:
                self.log.append(S3Request(op, bucket, key, int(status.split()[0])))
            return start_response(status, response_headers, exc_info)

        with self.serial:
            response = self.app(environ, record)
            try:
                body = b"".join(response)
            finally:
                if hasattr(response, "close"):
                    response.close()
        return [body]


def _quiet_handler():
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class QuietHandler(MotoRequestHandler):
        def log_request(self, code="-", size="-") -> None:  # no access log line per request
            pass

    return QuietHandler


class S3Server:
    """A running moto S3 server with one bucket (see the module docstring)."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.bucket = f"arcflow-test-{uuid.uuid4().hex[:8]}"
        self._recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self._recorder, threaded=True, request_handler=_quiet_handler())
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()

    # -- what tests use ---------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment that points fsspec/s3fs and botocore at this server."""
        return {
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
            "FSSPEC_S3_KEY": KEY,
            "FSSPEC_S3_SECRET": SECRET,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION,
            # nothing from the user's machine, and no lookup of the EC2 metadata service
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *parts])

    def fs(self):
        """An s3fs filesystem on this server (fresh, no listing cache)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)

    @property
    def requests(self) -> list[S3Request]:
        with self._recorder.lock:
            return list(self._recorder.log)

    def clear_requests(self) -> None:
        with self._recorder.lock:
            self._recorder.log.clear()

    def ops(self, key_prefix: str = "", since: int = 0) -> list[str]:
        """The operation names of the requests recorded (from index ``since``) on keys under
        ``key_prefix`` (bucket-level requests count under the prefix ``""`` only)."""
        return [r.op for r in self.requests[since:] if r.key.startswith(key_prefix) and (r.key or not key_prefix)]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextlib.contextmanager
def s3_environment(env: dict[str, str | None]) -> Iterator[None]:
    """Set ``env`` for this process and its children (a ``None`` value unsets that variable), and
    fsspec's own ``s3`` defaults from its ``FSSPEC_S3_*`` entries; undo both (and drop fsspec's
    cached filesystems) on exit. Nests: e.g. ``{**server.env, "FSSPEC_S3_ENDPOINT_URL": other}``."""
    import fsspec.config

    inherited = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    env = {**dict.fromkeys(inherited), **env}
    s3_conf = {k[len("FSSPEC_S3_"):].lower(): v for k, v in env.items() if k.startswith("FSSPEC_S3_") and v is not None}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
        mp.setitem(fsspec.config.conf, "s3", s3_conf)
        _clear_s3_instances()
        try:
            yield
        finally:
            _clear_s3_instances()


def _clear_s3_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server with a fresh bucket, visible to this process, its subprocesses and the Ray
    workers they start; everything undone after the module."""
    server = S3Server()
    try:
        with s3_environment(server.env):
            server.fs().mkdir(server.bucket)
            yield server
    finally:
        server.stop()
