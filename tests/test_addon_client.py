"""The add-on's stdlib client and worker against a hostile or broken HTTP server (a tiny
http.server in a thread): the token never follows a redirect to another host, a download
never runs past its size or its deadline and never leaves a partial file, a frame's file name
cannot leave the download folder, and typos in the server URL are clear errors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from blender_addon import worker
from blender_addon.client import FarmClient, FarmError, normalise_server

SEEN: list[tuple[str, str, str | None]] = []


class Hostile(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        SEEN.append((self.headers.get("Host", ""), self.path, self.headers.get("Authorization")))
        port = self.server.server_address[1]
        if self.path == "/redirect-away":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/stolen")
            self.end_headers()
        elif self.path == "/redirect-here":
            self.send_response(302)
            self.send_header("Location", "/here")
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * (3 << 20))
        elif self.path == "/trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)
        elif self.path.startswith("/api/jobs/j1/outputs"):
            body = json.dumps(
                {
                    "frames": [
                        {
                            "frame": 1,
                            "filename": "../../escape.png",
                            "size_bytes": 3,
                            "sha256": "",
                            "url": "/f1",
                        },
                        {"frame": 2, "filename": "/etc/passwd", "size_bytes": 3, "sha256": "", "url": "/f1"},
                        {"frame": 3, "filename": "same.png", "size_bytes": 3, "sha256": "", "url": "/f1"},
                        {"frame": 4, "filename": "same.png", "size_bytes": 3, "sha256": "", "url": "/f1"},
                    ]
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/f1":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"abc")
        elif self.path == "/api/me":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(
                json.dumps(
                    {
                        "username": "ada",
                        "projects": [
                            {"name": "a", "role": "artist"},
                            {"name": "b", "role": "viewer"},
                            {"name": "c", "role": "manager"},
                        ],
                    }
                ).encode()
            )
        else:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")


@pytest.fixture
def hostile() -> Iterator[str]:
    SEEN.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_token_does_not_follow_a_redirect_to_another_host(hostile: str, tmp_path: Path) -> None:
    c = FarmClient(hostile, "rfp_secret")
    c.download("/redirect-here", tmp_path / "a")
    c.download("/redirect-away", tmp_path / "b")
    auth = {path: a for _, path, a in SEEN}
    assert auth["/redirect-here"] == auth["/here"] == "Bearer rfp_secret"  # same host: still sent
    assert auth["/redirect-away"] == "Bearer rfp_secret"
    assert auth["/stolen"] is None  # localhost is another host than 127.0.0.1


def test_a_download_never_runs_past_its_size_or_deadline(hostile: str, tmp_path: Path) -> None:
    c = FarmClient(hostile, "t")
    with pytest.raises(FarmError, match="more than the 1000 bytes expected"):
        c.download("/huge", tmp_path / "f.png", total=1000)
    t0 = time.monotonic()
    with pytest.raises(FarmError, match="took too long"):
        c.download("/trickle", tmp_path / "g.png", deadline_s=1)
    assert time.monotonic() - t0 < 5
    assert list(tmp_path.iterdir()) == []  # no partial file, no .part


def test_frame_file_names_cannot_leave_the_download_folder(hostile: str, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "j1"
    paths = worker.download(FarmClient(hostile, "t"), "j1", dest, lambda fn, *a: None)
    assert [p.name for p in paths] == ["escape.png", "passwd", "same.png", "same~1.png"]
    assert all(p.parent == dest and p.read_bytes() == b"abc" for p in paths)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(p.name for p in paths)


def test_links_that_are_not_http_are_refused(hostile: str, tmp_path: Path) -> None:
    with pytest.raises(FarmError, match="not http"):
        FarmClient(hostile, "t").download("file:///etc/passwd", tmp_path / "x")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:39x7", "port"),
        ("http://farm:3000/ space", "spaces"),
        ("ftp://farm", "http"),
        ("", "http"),
        ("http://farm:99999", "port"),
        ("http://farm:0", "port"),
        ("http://[::1", "IPv6"),
        ("http://\u2018farm\u2019:3000", "typographic quotes"),
    ],
)
def test_server_url_typos_are_clear_errors(url: str, why: str) -> None:
    with pytest.raises(FarmError, match=why):
        normalise_server(url)


def test_server_url_forms_that_work() -> None:
    assert normalise_server(" farm.lan:3000/ ") == "http://farm.lan:3000"
    assert normalise_server("https://farm.lan/renderfarm/") == "https://farm.lan/renderfarm"


def test_the_project_is_checked_before_anything_is_packed(hostile: str) -> None:
    c = FarmClient(hostile, "t")
    assert worker.preflight(c, "a") == "a"
    with pytest.raises(FarmError, match="role in project 'b' is viewer"):
        worker.preflight(c, "b")
    with pytest.raises(FarmError, match="not a member of project 'zz'"):
        worker.preflight(c, "zz")
    with pytest.raises(FarmError, match=r"several \(a, c\)"):
        worker.preflight(c, "")


def test_frame_specs_are_checked_with_the_farms_own_parser() -> None:
    assert worker.check_frames("1-5x2") == [1, 3, 5]
    for bad in ("abc", "10-1", "1-"):
        with pytest.raises(FarmError) as err:
            worker.check_frames(bad)
        assert err.value.field == "frames"


def test_a_download_without_a_size_is_still_capped(
    hostile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame whose size the farm does not say (or says absurdly) is capped at MAX_DOWNLOAD_BYTES."""
    from blender_addon import client

    monkeypatch.setattr(client, "MAX_DOWNLOAD_BYTES", 1 << 20)
    with pytest.raises(FarmError, match="more than"):
        FarmClient(hostile, "t").download("/huge", tmp_path / "f.png")
    with pytest.raises(FarmError, match="more than"):
        FarmClient(hostile, "t").download("/huge", tmp_path / "f.png", total=10**15)
    assert list(tmp_path.iterdir()) == []


def test_what_a_peer_sends_is_made_printable() -> None:
    text = str(FarmError("unreachable", "banner: SSH-2.0-OpenSSH_9.6\r\n\x1b[31m"))
    assert text.isprintable() and text.startswith("banner: SSH-2.0-OpenSSH_9.6")
