"""S3 storage against a real S3 endpoint (moto in server mode, a separate process), and the
local storage's streaming reads; the API serving a real render's frames from S3."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import os
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
import boto3
import pytest
from yarl import URL

from cli.client import FarmClient
from cli.farm import free_port, running_farm
from node_agent.inputs import input_url
from server.auth.service import local_admin_token
from server.storage import ObjectNotFoundError, StorageKeyError, StorageUnavailableError, open_storage
from server.storage.local import LocalStorage
from server.storage.s3 import S3Storage, parse_s3_url
from tests import s3server
from tests.conftest import farm_settings
from tests.s3server import FAKE_ENV, make_bucket

s3_endpoint = s3server.s3_endpoint  # the fixtures, by assignment (a plain import would be shadowed)
s3_url = s3server.s3_url

MIB = 1 << 20


def _bucket(url: str) -> str:
    return urlsplit(url).netloc


def _client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


async def _read_all(storage: S3Storage | LocalStorage, key: str, chunk_size: int = 1 << 20) -> bytes:
    out = bytearray()
    async for chunk in await storage.open_read(key, chunk_size):
        out += chunk
    return bytes(out)


# --------------------------------------------------------------------------- SigV4 check


def _sigv4_valid(url: str, secret: str) -> bool:
    """Recompute the SigV4 query signature of a presigned GET URL (what S3 does) and compare."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    q = dict(query)
    given = q.pop("X-Amz-Signature")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(q.items())
    )
    assert q["X-Amz-SignedHeaders"] == "host"
    canonical = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    scope = q["X-Amz-Credential"].split("/", 1)[1]
    date, region, service, _ = scope.split("/")
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            q["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), given)


def _with_param(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    q = [(k, value if k == name else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(q, quote_via=quote)))


# --------------------------------------------------------------------------- S3 storage


async def test_put_exists_size_read_delete_round_trip(s3_url: str, s3_endpoint: str, tmp_path: Path) -> None:
    url = s3_url.replace("?", "/farm/a?", 1)  # under a prefix
    storage = open_storage(url, "unused")
    assert isinstance(storage, S3Storage)
    await storage.check()
    data = os.urandom(300_000)
    src = _file(tmp_path, "frame.png", data)
    assert await storage.put_file("jobs/j1/frames/frame_000001.png", src) == len(data)
    assert not src.exists()  # moved into storage, like the local backend
    assert await storage.exists("jobs/j1/frames/frame_000001.png")
    assert await storage.size("jobs/j1/frames/frame_000001.png") == len(data)
    assert await _read_all(storage, "jobs/j1/frames/frame_000001.png", 64 * 1024) == data
    assert storage.local_path("jobs/j1/frames/frame_000001.png") is None

    # the object really is in the bucket, under the prefix, with an image content type
    head = _client(s3_endpoint).head_object(
        Bucket=_bucket(s3_url), Key="farm/a/jobs/j1/frames/frame_000001.png"
    )
    assert head["ContentLength"] == len(data) and head["ContentType"] == "image/png"

    # a reader left early releases its connection and stops
    reader = await storage.open_read("jobs/j1/frames/frame_000001.png", 1000)
    async with contextlib.aclosing(reader):
        assert len(await anext(reader)) == 1000
    assert [c async for c in reader] == []

    await storage.delete("jobs/j1/frames/frame_000001.png")
    assert not await storage.exists("jobs/j1/frames/frame_000001.png")
    assert await storage.size("jobs/j1/frames/frame_000001.png") is None
    with pytest.raises(ObjectNotFoundError, match=r"frame_000001\.png"):
        await storage.open_read("jobs/j1/frames/frame_000001.png")
    await storage.delete("jobs/j1/frames/frame_000001.png")  # absent: no error
    for bad in ("../x", "/abs", "a//b", "a/../b", ".hidden"):
        with pytest.raises(StorageKeyError):
            await storage.exists(bad)


async def test_large_file_goes_multipart_and_reads_back_identical(s3_endpoint: str, tmp_path: Path) -> None:
    url = make_bucket(s3_endpoint, multipart_mb="5")
    storage = open_storage(url, "unused")
    assert isinstance(storage, S3Storage) and storage.multipart_threshold == 5 * MIB
    big = os.urandom(12 * MIB + 123)
    small = os.urandom(1 * MIB)
    await storage.put_file("models/m1/package.zip", _file(tmp_path, "big.bin", big))
    await storage.put_file("models/m2/scene.blend", _file(tmp_path, "small.bin", small))
    client = _client(s3_endpoint)
    # A multipart upload's ETag is "<md5 of the parts' md5s>-<number of parts>".
    etag_big = client.head_object(Bucket=_bucket(url), Key="models/m1/package.zip")["ETag"].strip('"')
    etag_small = client.head_object(Bucket=_bucket(url), Key="models/m2/scene.blend")["ETag"].strip('"')
    assert etag_big.endswith("-3"), etag_big  # 5 + 5 + 2 MiB
    assert "-" not in etag_small and etag_small == hashlib.md5(small).hexdigest()
    assert await storage.size("models/m1/package.zip") == len(big)
    got = hashlib.sha256()
    async for chunk in await storage.open_read("models/m1/package.zip"):
        got.update(chunk)
    assert got.hexdigest() == hashlib.sha256(big).hexdigest()


async def test_presigned_url_downloads_without_credentials_and_expires(
    s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    storage = open_storage(s3_url, "unused")
    data = os.urandom(50_000)
    await storage.put_file("jobs/j/frames/frame_000007.png", _file(tmp_path, "f.png", data))
    url = storage.signed_url("jobs/j/frames/frame_000007.png", 1, "frame_000007.png")
    assert url.startswith(f"{s3_endpoint}/{_bucket(s3_url)}/jobs/j/frames/frame_000007.png?")
    q = dict(parse_qsl(urlsplit(url).query))
    assert q["X-Amz-Expires"] == "1" and q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert q["response-content-disposition"] == 'attachment; filename="frame_000007.png"'
    assert FAKE_ENV["AWS_SECRET_ACCESS_KEY"] not in url.replace(FAKE_ENV["AWS_ACCESS_KEY_ID"] + "%2F", "")

    # plain HTTP, no credentials, no boto3
    async with aiohttp.ClientSession() as http, http.get(URL(url, encoded=True)) as r:
        assert r.status == 200 and await r.read() == data
        assert r.headers["Content-Disposition"] == 'attachment; filename="frame_000007.png"'

    # The signature covers the expiry: S3 recomputes it, so a longer-lived copy is refused.
    # (moto does not check presigned signatures or expiry; this is the check S3/MinIO make.)
    assert _sigv4_valid(url, FAKE_ENV["AWS_SECRET_ACCESS_KEY"])
    assert not _sigv4_valid(_with_param(url, "X-Amz-Expires", "604800"), FAKE_ENV["AWS_SECRET_ACCESS_KEY"])
    assert not _sigv4_valid(url, "another-secret")
    signed_at = datetime.strptime(q["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    assert abs(signed_at - time.time()) < 5
    await asyncio.sleep(2.1)
    assert signed_at + int(q["X-Amz-Expires"]) < time.time()  # expired by its own signed terms
    # longest life: 7 days (SigV4's limit)
    long = dict(parse_qsl(urlsplit(storage.signed_url("jobs/j/frames/frame_000007.png", 10**9)).query))
    assert long["X-Amz-Expires"] == "604800" and "response-content-disposition" not in long


async def test_addressing_styles_and_public_endpoint(s3_endpoint: str) -> None:
    path = open_storage("s3://renders/p?endpoint=http://localhost:9000&addressing=path", "x")
    assert path.signed_url("a/b.png", 60).startswith("http://localhost:9000/renders/p/a/b.png?")
    virtual = open_storage("s3://renders/p?endpoint=http://localhost:9000&addressing=virtual", "x")
    assert virtual.signed_url("a/b.png", 60).startswith("http://renders.localhost:9000/p/a/b.png?")
    cos = open_storage(
        "s3://renders-1250000000?endpoint=https://cos.ap-guangzhou.myqcloud.com&region=ap-guangzhou"
        "&addressing=virtual",
        "x",
    )
    cos_url = cos.signed_url("a.png", 60)
    assert cos_url.startswith("https://renders-1250000000.cos.ap-guangzhou.myqcloud.com/a.png?")
    assert "%2Fap-guangzhou%2Fs3%2Faws4_request" in cos_url
    public = open_storage(
        "s3://renders?endpoint=http://minio:9000&public_endpoint=https://s3.studio.example&addressing=path",
        "x",
    )
    assert public.signed_url("a.png", 60).startswith("https://s3.studio.example/renders/a.png?")
    aws = open_storage("s3://renders?region=eu-west-1", "x")
    assert ".amazonaws.com" in aws.signed_url("a.png", 60)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "no bucket name"),
        ("s3:///prefix", "no bucket name"),
        ("s3://Bad_Bucket", "not a valid bucket name"),
        ("s3://ab", "not a valid bucket name"),
        ("s3://bucket/../x", "prefix"),
        ("s3://bucket?endpoint=minio:9000", "endpoint must be http(s)://host[:port]"),
        ("s3://bucket?endpoint=ftp://minio", "endpoint must be http(s)://host[:port]"),
        ("s3://bucket?endpoint=http://minio:port", "bad port"),
        ("s3://bucket?addressing=sideways", "addressing must be path, virtual or auto"),
        ("s3://bucket?multipart_mb=1", "multipart_mb must be between 5 and 5120"),
        ("s3://bucket?multipart_mb=lots", "multipart_mb must be a whole number"),
        ("s3://bucket?create_bucket=maybe", "create_bucket must be 1 or 0"),
        ("s3://bucket?regoin=us-east-1", "unknown parameter 'regoin'"),
        ("s3://bucket?region=us-east-1&region=eu-west-1", "given twice"),
        ("s3://bucket?region=Not%20A%20Region", "is not a region name"),
        ("s3://AKIAEXAMPLE:SUPERSECRET@bucket", "credentials do not belong in the URL"),
        ("s3://bucket?secret_key=SUPERSECRET", "credentials do not belong in the URL"),
        ("s3://bucket?endpoint=http://me:SUPERSECRET@minio:9000", "must not carry credentials"),
        ("ftp://me:SUPERSECRET@host/x?access_key=SUPERSECRET", "unsupported storage URL"),
    ],
)
def test_bad_urls_are_refused_clearly_without_secrets(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="storage URL") as err:
        open_storage(url, "unused")
    assert message in str(err.value)
    assert "SUPERSECRET" not in str(err.value)


def test_url_parameters() -> None:
    assert parse_s3_url("s3://renders/farm/a/?endpoint=http://127.0.0.1:9000/&create_bucket=1") == {
        "bucket": "renders",
        "prefix": "farm/a",
        "endpoint": "http://127.0.0.1:9000",
        "public_endpoint": None,
        "region": "us-east-1",
        "addressing": "auto",
        "multipart_threshold": 64 * MIB,
        "create_bucket": True,
    }


async def test_check_names_a_missing_bucket_and_can_create_it(s3_endpoint: str) -> None:
    name = f"rf-missing-{os.urandom(4).hex()}"
    storage = open_storage(f"s3://{name}?endpoint={s3_endpoint}&addressing=path", "unused")
    with pytest.raises(StorageUnavailableError) as err:
        await storage.check()
    assert f"bucket '{name}' does not exist" in str(err.value) and s3_endpoint in str(err.value)
    client = _client(s3_endpoint)
    assert name not in [b["Name"] for b in client.list_buckets()["Buckets"]]

    creating = open_storage(f"s3://{name}?endpoint={s3_endpoint}&addressing=path&create_bucket=1", "unused")
    await creating.check()
    assert name in [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert client.list_objects_v2(Bucket=name).get("KeyCount") == 0  # the probe was removed
    await storage.check()  # now it exists


async def test_check_names_an_unreachable_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = open_storage(f"s3://renders?endpoint={endpoint}&addressing=path", "unused")
    with pytest.raises(StorageUnavailableError, match="unreachable") as err:
        await storage.check()
    assert endpoint in str(err.value)


async def test_check_without_credentials_says_which_to_set(
    s3_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    storage = open_storage(s3_url, "unused")
    with pytest.raises(StorageUnavailableError, match="no S3 credentials found") as err:
        await storage.check()
    assert "AWS_ACCESS_KEY_ID" in str(err.value)


async def test_store_into_a_missing_bucket_says_so(s3_endpoint: str, tmp_path: Path) -> None:
    storage = open_storage(f"s3://rf-nope-{os.urandom(4).hex()}?endpoint={s3_endpoint}&addressing=path", "u")
    with pytest.raises(StorageUnavailableError) as err:
        await storage.put_file("a.png", _file(tmp_path, "a.png", b"x"))
    assert "does not exist" in str(err.value) and "storing 'a.png'" in str(err.value)


# --------------------------------------------------------------------------- local storage


async def test_local_storage_streams_sizes_and_checks(tmp_path: Path) -> None:
    storage = open_storage((tmp_path / "store").as_uri(), "secret")
    assert isinstance(storage, LocalStorage)
    await storage.check()
    data = os.urandom(2 * MIB + 5)
    await storage.put_file("jobs/j/frames/frame_000001.exr", _file(tmp_path, "f.exr", data))
    assert await storage.size("jobs/j/frames/frame_000001.exr") == len(data)
    assert await storage.size("jobs/j/frames") is None  # a folder is no object
    assert await storage.size("jobs/j/frames/nope.exr") is None
    assert await _read_all(storage, "jobs/j/frames/frame_000001.exr", 100_000) == data
    with pytest.raises(ObjectNotFoundError):
        await storage.open_read("jobs/j/frames/nope.exr")
    assert storage.signed_url("jobs/j/frames/frame_000001.exr", 60).startswith("/files/")

    (tmp_path / "store").chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(StorageUnavailableError, match="not writable"):
                await storage.check()
    finally:
        (tmp_path / "store").chmod(0o700)


def test_agent_resolves_relative_and_absolute_input_urls() -> None:
    server = "http://127.0.0.1:3000"
    url, same = input_url(server, "/files/models/m/scene.blend?exp=1&sig=ab")
    assert str(url) == "http://127.0.0.1:3000/files/models/m/scene.blend?exp=1&sig=ab" and same
    presigned = "http://127.0.0.1:9000/b/models/m/x.blend?X-Amz-Credential=testing%2F20250101%2Fus-east-1"
    url, same = input_url(server, presigned)
    assert str(url) == presigned and not same  # byte for byte, and no agent token sent there
    url, same = input_url(server, server + "/files/x?sig=1")
    assert same


# --------------------------------------------------------------------------- the API on S3


@pytest.mark.blender
@pytest.mark.parametrize("backend", ["s3", "file"])
async def test_farm_renders_lists_serves_and_zips_frames(
    backend: str, s3_endpoint: str, sample_blend: Path, tmp_path: Path
) -> None:
    """A real render through the farm on S3 storage, and the same on local storage."""
    url = make_bucket(s3_endpoint, prefix="studio") if backend == "s3" else ""
    settings = farm_settings(tmp_path / "farm", storage_url=url)
    async with (
        running_farm(settings, port=free_port(), agents=1) as farm,
        FarmClient(farm.url, await local_admin_token(farm.ctx, "tests")) as client,
        aiohttp.ClientSession() as plain,  # no credentials of any kind
    ):
        storage = farm.ctx.storage
        await storage.check()
        model = await client.upload_model(sample_blend)
        if backend == "s3":
            s3 = _client(s3_endpoint)
            key = f"studio/models/{model['id']}/sample_scene.blend"
            stored = s3.get_object(Bucket=_bucket(url), Key=key)["Body"].read()
            assert hashlib.sha256(stored).hexdigest() == model["sha256"]

        job = await client.create_job(
            model_id=model["id"], frames="1-2", chunk_size=2, resolution_percentage=25
        )
        deadline = time.monotonic() + 120
        while (state := (await client.job(job["id"]))["state"]) not in ("completed", "failed", "canceled"):
            assert time.monotonic() < deadline, "job did not finish in 120 s"
            await asyncio.sleep(0.5)
        assert state == "completed", await client.tasks(job["id"])

        out = await client.outputs(job["id"])
        assert [f["frame"] for f in out["frames"]] == [1, 2]
        frames_url = f"{s3_endpoint}/{_bucket(url)}/studio/jobs/{job['id']}/frames/"
        if backend == "s3":  # nothing on the server's disk: all in the bucket
            assert not list((tmp_path / "farm").rglob("frame_*.png"))
        for f in out["frames"]:
            if backend == "s3":
                assert f["url"].startswith(frames_url)
            else:
                assert f["url"].startswith(f"/files/jobs/{job['id']}/frames/")
            target = URL(f["url"], encoded=True) if backend == "s3" else farm.url + f["url"]
            async with plain.get(target) as r:
                body = await r.read()
                assert r.status == 200 and hashlib.sha256(body).hexdigest() == f["sha256"]
                assert body[:8] == b"\x89PNG\r\n\x1a\n"
                assert r.headers["Content-Disposition"] == f'attachment; filename="{f["filename"]}"'

        # one frame: a redirect to a short-lived presigned URL on S3, the file itself locally
        one = f"{farm.url}/api/jobs/{job['id']}/outputs/2"
        async with client.http.get(one, allow_redirects=False, headers=client.auth) as r:
            if backend == "s3":
                assert r.status == 302
                location = r.headers["Location"]
                assert location.startswith(frames_url + "frame_000002.png?")
                assert int(dict(parse_qsl(urlsplit(location).query))["X-Amz-Expires"]) <= 300
            else:
                assert r.status == 200
        async with plain.get(one, headers=client.auth) as r:  # redirect followed, with no token for S3
            body = await r.read()
            assert r.status == 200 and hashlib.sha256(body).hexdigest() == out["frames"][1]["sha256"]

        # the zip, streamed from storage
        async with plain.get(f"{farm.url}/api/jobs/{job['id']}/outputs.zip", headers=client.auth) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/zip"
            raw = await r.read()
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            assert zf.testzip() is None
            assert zf.namelist() == ["frame_000001.png", "frame_000002.png"]
            for f in out["frames"]:
                assert hashlib.sha256(zf.read(f["filename"])).hexdigest() == f["sha256"]

        # storage failing in the middle of the zip: the download fails visibly, not truncated
        real_open = storage.open_read

        async def failing_open(key: str, chunk_size: int = MIB) -> object:
            if key.endswith("frame_000002.png"):
                raise StorageUnavailableError("store went away")
            return await real_open(key, chunk_size)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(storage, "open_read", failing_open)
            with pytest.raises(aiohttp.ClientPayloadError):
                async with plain.get(
                    f"{farm.url}/api/jobs/{job['id']}/outputs.zip", headers=client.auth
                ) as r:
                    assert r.status == 200
                    await r.read()

        # a frame whose object vanished: the zip leaves it out; with none left, a clean 404
        await storage.delete(f"jobs/{job['id']}/frames/frame_000002.png")
        async with plain.get(f"{farm.url}/api/jobs/{job['id']}/outputs.zip", headers=client.auth) as r:
            names = zipfile.ZipFile(io.BytesIO(await r.read())).namelist()
        assert names == ["frame_000001.png"]
        await storage.delete(f"jobs/{job['id']}/frames/frame_000001.png")
        async with plain.get(f"{farm.url}/api/jobs/{job['id']}/outputs.zip", headers=client.auth) as r:
            assert r.status == 404 and "missing from storage" in (await r.json())["error"]["message"]


@pytest.mark.blender
async def test_upload_while_the_bucket_is_gone_is_503_and_keeps_nothing(
    s3_endpoint: str, sample_blend: Path, tmp_path: Path
) -> None:
    url = make_bucket(s3_endpoint)
    settings = farm_settings(tmp_path / "farm", storage_url=url)
    async with running_farm(settings, port=free_port(), agents=0) as farm, FarmClient(farm.url) as client:
        client.token = token = await local_admin_token(farm.ctx, "tests")
        await farm.ctx.storage.check()
        _client(s3_endpoint).delete_bucket(Bucket=_bucket(url))
        with open(sample_blend, "rb") as fh:
            data = fh.read()
        async with client.http.post(
            f"{farm.url}/api/models",
            params={"filename": "scene.blend"},
            data=data,
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            err = (await r.json())["error"]
        assert r.status == 503 and "storage is unavailable" in err["message"]
        assert _bucket(url) not in err["message"]  # the store's details stay in the server log
        async with client.http.get(f"{farm.url}/api/models", headers=client.auth) as r:
            assert (await r.json())["models"] == []
        async with client.http.get(f"{farm.url}/healthz") as r:  # the outage shows in the health check
            health = await r.json()
        assert r.status == 200 and health["status"] == "degraded"
        assert health["storage"].startswith("degraded")
        _client(s3_endpoint).create_bucket(Bucket=_bucket(url))
        farm.ctx.storage.recheck_s = 0
        async with client.http.get(f"{farm.url}/healthz") as r:  # and clears once the store answers
            health = await r.json()
        assert health["status"] == "ok" and health["storage"] == "ok"
