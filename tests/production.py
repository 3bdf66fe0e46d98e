"""The production backends for tests: a fresh MariaDB database, a RabbitMQ vhost, Redis and moto's S3.

``production_backends(request)`` yields the settings fields (``database_url``,
``broker_url``, ``cache_url``, ``storage_url``) of a farm on real services, each
fresh for the test: a database ``rf_<hex>`` on the shared MariaDB, a vhost
``rf_<hex>`` on the shared RabbitMQ (so no queue is shared between tests), the
shared Redis (keys are ids, channels per job) or a private ``redis-server``, and a
new bucket on the session's moto server. Everything is removed afterwards.

A farm process checks every user request's token: :func:`admin_token` logs in as its
first admin (the generated password is in ``<data_dir>/secrets/initial-admin-password``)
and makes a personal token; :func:`agent_token` makes an agent token bound to a name.

:class:`PrivateRedis` runs a ``redis-server`` of the test's own, which a fault test
may stop and start again without touching the machine's one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mariadb import fresh_database, unreachable_reason
from tests.s3server import make_bucket

RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
REDIS = "redis://127.0.0.1:6379/0"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def services_reason() -> str | None:
    """Why the production backends cannot be used here, or None."""
    why = unreachable_reason()
    if why:
        return why
    for name, port in (("RabbitMQ", 5672), ("Redis", 6379)):
        if not _port_open(port):
            return f"{name} is not answering on 127.0.0.1:{port} (run ../shared/services.sh)"
    return None


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl`` and return its output.

    Raises:
        subprocess.CalledProcessError: it failed.
    """
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout


@contextlib.contextmanager
def fresh_vhost() -> Iterator[str]:
    """A new RabbitMQ vhost for guest; yields its AMQP URL and deletes it afterwards."""
    name = f"rf_{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{RABBIT}{name}"
    finally:
        with contextlib.suppress(Exception):
            rabbitmqctl("delete_vhost", name)


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port; ``stop()`` kills it, ``start()`` restarts it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its ``redis://`` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it answers (10 s at most)."""
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _port_open(self.port):
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (SIGKILL: what a crash looks like to clients)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def production_backends(
    request: pytest.FixtureRequest, private_redis: PrivateRedis | None = None
) -> Iterator[dict[str, Any]]:
    """Settings fields for a farm on MariaDB, RabbitMQ, Redis and moto's S3, fresh for one test.

    Skips the test (saying why) when a service is not reachable.
    """
    why = services_reason()
    if why:
        pytest.skip(why)
    endpoint = request.getfixturevalue("s3_endpoint")
    with fresh_database() as db_url, fresh_vhost() as amqp_url:
        yield {
            "database_url": db_url,
            "broker_url": amqp_url,
            "cache_url": private_redis.url if private_redis else REDIS,
            "storage_url": make_bucket(endpoint),
        }


def backend_env(backends: dict[str, Any], **more: Any) -> dict[str, str]:
    """The environment for a farm process using ``backends`` (``RENDERFARM_<FIELD>`` variables)."""
    env = dict(os.environ)
    for key, value in {**backends, **more}.items():
        env[f"RENDERFARM_{key.upper()}"] = str(value)
    return env


def _post_json(url: str, body: dict[str, Any], token: str | None = None, timeout: float = 10) -> Any:
    """POST ``body`` to ``url``; the JSON answer.

    Raises:
        urllib.error.HTTPError: the server refused it.
    """
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def admin_token(url: str, data_dir: Path, name: str = "tests") -> str:
    """A personal token (``rfp_...``, 30 days) of the first admin of the farm server at ``url``
    whose data folder is ``data_dir``: logs in as ``admin`` with the password the server
    generated at its first start (``data_dir/secrets/initial-admin-password``).

    Raises:
        OSError: the password file is missing (the server has not started yet).
        urllib.error.HTTPError: the login or the token was refused.
    """
    password = (data_dir / "secrets" / "initial-admin-password").read_text().strip()
    login = _post_json(url + "/api/auth/login", {"username": "admin", "password": password})
    return _post_json(url + "/api/tokens", {"name": name, "expires_days": 30}, login["access_token"])["token"]


def agent_token(url: str, admin: str, agent_name: str) -> str:
    """A new agent token (``rfa_...``) bound to ``agent_name``, made by the admin token ``admin``.

    Raises:
        urllib.error.HTTPError: it was refused (e.g. 403: ``admin`` is not an admin's token).
    """
    return _post_json(url + "/api/agent-tokens", {"agent_name": agent_name}, admin)["token"]
