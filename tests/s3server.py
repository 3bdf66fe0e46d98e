"""A real S3 endpoint on loopback for tests: ``moto_server`` run as a separate process.

Use from a test module (``tests`` is a package, so this imports as ``tests.s3server``)::

    from tests.s3server import s3_endpoint, s3_url  # noqa: F401  (pytest fixtures)

    async def test_x(s3_url: str) -> None:  # a fresh, empty bucket per test
        storage = open_storage(s3_url, "unused")

or make the fixtures available to every test module by importing them in
``tests/conftest.py`` the same way. :func:`make_bucket` makes more buckets.

The session fixture sets fake credentials (``AWS_ACCESS_KEY_ID=testing``...) in the
environment for boto3, and the moto server process is stopped at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
"""Credentials and settings boto3 gets in the test session (moto accepts any)."""

UNSET_ENV = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(port: int | None = None, timeout_s: float = 60.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m moto.server`` on 127.0.0.1 and wait until it answers.

    Returns:
        (the process, its endpoint URL ``http://127.0.0.1:PORT``).

    Raises:
        RuntimeError: with the server's output when it exits or does not answer in ``timeout_s``.
    """
    port = port or _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **FAKE_ENV},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2) as resp:
                if resp.status == 200:
                    return proc, endpoint
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_moto(proc)
            log.seek(0)
            out = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"moto_server on port {port} did not start:\n{out}")
        time.sleep(0.1)


def stop_moto(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started by :func:`start_moto` (terminate, then kill after 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def make_bucket(endpoint: str, prefix: str = "", **params: str) -> str:
    """Create a fresh, uniquely named bucket on ``endpoint``; return its ``s3://`` storage URL.

    The URL names the endpoint, ``region=us-east-1`` and ``addressing=path``; ``params``
    add or replace query parameters (e.g. ``multipart_mb="5"``), and ``prefix`` is put
    after the bucket name.
    """
    import boto3

    bucket = f"rf-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=FAKE_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=bucket)
    query = {"endpoint": endpoint, "region": "us-east-1", "addressing": "path", **params}
    path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
    return f"s3://{bucket}{path}?{urlencode(query)}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server (separate process) for the whole test session; yields its endpoint URL.

    Sets fake AWS credentials in ``os.environ`` while it lives.
    """
    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAKE_ENV.items():
            mp.setenv(k, v)
        for k in UNSET_ENV:
            mp.delenv(k, raising=False)
        proc, endpoint = start_moto()
        try:
            yield endpoint
        finally:
            stop_moto(proc)


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """The ``s3://`` storage URL of a fresh, empty bucket on the session's moto server."""
    return make_bucket(s3_endpoint)
