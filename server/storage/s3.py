"""S3-compatible object storage (AWS S3, MinIO, Alibaba OSS, Tencent COS) through boto3.

Chosen by a storage URL of the form::

    s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME&addressing=path|virtual|auto
        [&public_endpoint=URL][&multipart_mb=64][&create_bucket=1]

Examples:

* AWS S3: ``s3://studio-renders/farm?region=eu-west-1``
* MinIO (path-style): ``s3://renderfarm?endpoint=http://minio:9000&region=us-east-1&addressing=path``
* Alibaba OSS (virtual-hosted, required):
  ``s3://studio-renders/farm?endpoint=https://s3.oss-cn-hangzhou.aliyuncs.com&region=cn-hangzhou&addressing=virtual``
* Tencent COS (virtual-hosted, required; the bucket name carries the APPID):
  ``s3://renders-1250000000/farm?endpoint=https://cos.ap-guangzhou.myqcloud.com&region=ap-guangzhou&addressing=virtual``

Query parameters:

* ``endpoint``: the S3 API's base URL (``http(s)://host[:port]``); absent means AWS.
* ``region``: the signing region (default ``us-east-1``).
* ``addressing``: ``path`` (``http://host/bucket/key``, MinIO), ``virtual``
  (``http://bucket.host/key``, OSS and COS require it) or ``auto`` (boto3's choice, the
  default). An endpoint that is an IP address is always addressed path-style.
* ``public_endpoint``: the base URL put into presigned download links when clients
  (agents, artists) reach the store under another name than the server does, e.g.
  ``endpoint=http://minio:9000&public_endpoint=https://s3.studio.example``.
* ``multipart_mb``: files of this many MiB or more are uploaded in parts of this
  size (default 64, at least 5, S3's smallest part).
* ``create_bucket=1``: :meth:`S3Storage.check` creates a missing bucket (tests, a
  first MinIO start); by default a missing bucket is an error.

Credentials come from boto3's standard chain, never from the URL: the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optionally ``AWS_SESSION_TOKEN`` or
``AWS_PROFILE``), the shared credentials file, or an instance/container role. A URL
carrying a user name, a password or a key-like parameter is refused, and no message
names a credential.

Only the server holds credentials. Agents receive presigned GET URLs for their own
task's input (the model) and upload frames to the server over the agent API, which
writes them here.
"""

from __future__ import annotations

import asyncio
import mimetypes
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from server.storage.base import (
    READ_CHUNK,
    SECRET_HINTS,
    ChunkReader,
    ObjectNotFoundError,
    StorageUnavailableError,
    check_key,
    download_name,
    redact_url,
)

MIB = 1 << 20
DEFAULT_MULTIPART_BYTES = 64 * MIB
MIN_PART_BYTES = 5 * MIB
MAX_PRESIGN_S = 7 * 24 * 3600
"""SigV4 presigned URLs live at most 7 days."""

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_PARAMS = {"endpoint", "region", "addressing", "public_endpoint", "multipart_mb", "create_bucket"}


def _redacted(url: str) -> str:
    """``url`` without user info, and with the values of parameters other than known ones masked."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(
        f"{k}={redact_url(v) if k.endswith('endpoint') else v}" if k in _PARAMS else f"{k}=***"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return f"{parts.scheme}://{host}{parts.path}" + (f"?{query}" if query else "")


def _check_endpoint(url: str, value: str, name: str) -> str:
    ep = urlsplit(value)
    if ep.scheme not in ("http", "https") or not ep.hostname or ep.query or ep.fragment:
        raise ValueError(f"bad storage URL {_redacted(url)!r}: {name} must be http(s)://host[:port]")
    if ep.username or ep.password:
        raise ValueError(
            f"bad storage URL {_redacted(url)!r}: {name} must not carry credentials; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        )
    try:
        ep.port  # noqa: B018  (raises on a non-numeric port)
    except ValueError:
        raise ValueError(f"bad storage URL {_redacted(url)!r}: {name} has a bad port") from None
    return value.rstrip("/")


def parse_s3_url(url: str) -> dict[str, Any]:
    """Parse an ``s3://`` storage URL into :class:`S3Storage` keyword arguments.

    Returns:
        ``{"bucket", "prefix", "endpoint", "public_endpoint", "region", "addressing",
        "multipart_threshold", "create_bucket"}``; ``multipart_threshold`` in bytes.

    Raises:
        ValueError: naming the (redacted) URL and what is wrong: no or invalid bucket
            name, credentials in the URL, an unknown or malformed parameter.
    """
    parts = urlsplit(url)
    shown = _redacted(url)
    if parts.scheme != "s3":
        raise ValueError(f"bad storage URL {shown!r}: expected s3://bucket[/prefix]?endpoint=...")
    if "@" in parts.netloc:
        raise ValueError(
            f"bad storage URL {shown!r}: credentials do not belong in the URL; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        )
    bucket = parts.netloc
    if not bucket:
        raise ValueError(f"bad storage URL {shown!r}: no bucket name (s3://bucket[/prefix])")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(
            f"bad storage URL {shown!r}: {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit)"
        )
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError:
            raise ValueError(
                f"bad storage URL {shown!r}: the prefix {prefix!r} must be slash-separated "
                "names of letters, digits, '.', '_' and '-'"
            ) from None
    if parts.fragment:
        raise ValueError(f"bad storage URL {shown!r}: no '#fragment' allowed")
    params: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if k not in _PARAMS:
            if any(h in k.lower() for h in SECRET_HINTS):
                raise ValueError(
                    f"bad storage URL {shown!r}: credentials do not belong in the URL ({k!r}); "
                    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
                )
            raise ValueError(
                f"bad storage URL {shown!r}: unknown parameter {k!r} (known: {', '.join(sorted(_PARAMS))})"
            )
        if k in params:
            raise ValueError(f"bad storage URL {shown!r}: parameter {k!r} given twice")
        params[k] = v
    endpoint = params.get("endpoint") or None
    if endpoint is not None:
        endpoint = _check_endpoint(url, endpoint, "endpoint")
    public = params.get("public_endpoint") or None
    if public is not None:
        public = _check_endpoint(url, public, "public_endpoint")
    region = params.get("region") or "us-east-1"
    if not re.fullmatch(r"[a-z0-9\-]{2,40}", region):
        raise ValueError(f"bad storage URL {shown!r}: region {region!r} is not a region name")
    addressing = params.get("addressing") or "auto"
    if addressing not in ("path", "virtual", "auto"):
        raise ValueError(f"bad storage URL {shown!r}: addressing must be path, virtual or auto")
    try:
        mb = int(params.get("multipart_mb") or DEFAULT_MULTIPART_BYTES // MIB)
    except ValueError:
        raise ValueError(f"bad storage URL {shown!r}: multipart_mb must be a whole number of MiB") from None
    if not 5 <= mb <= 5 * 1024:
        raise ValueError(f"bad storage URL {shown!r}: multipart_mb must be between 5 and 5120")
    create = params.get("create_bucket", "0")
    if create not in ("0", "1", "true", "false"):
        raise ValueError(f"bad storage URL {shown!r}: create_bucket must be 1 or 0")
    return {
        "bucket": bucket,
        "prefix": prefix,
        "endpoint": endpoint,
        "public_endpoint": public,
        "region": region,
        "addressing": addressing,
        "multipart_threshold": mb * MIB,
        "create_bucket": create in ("1", "true"),
    }


class S3Storage:
    """Objects in one bucket (under an optional prefix) of an S3-compatible store.

    Every boto3 call runs in a worker thread (``asyncio.to_thread``). Uploads use
    boto3's managed transfer, multipart from ``multipart_threshold`` bytes; an object
    appears whole or not at all. Download links are presigned GET URLs (absolute).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        public_endpoint: str | None = None,
        region: str = "us-east-1",
        addressing: str = "auto",
        multipart_threshold: int = DEFAULT_MULTIPART_BYTES,
        create_bucket: bool = False,
        url: str | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if multipart_threshold < MIN_PART_BYTES:
            raise ValueError(f"multipart_threshold must be at least {MIN_PART_BYTES} bytes (5 MiB)")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.region = region
        self.create_bucket = create_bucket
        self.multipart_threshold = multipart_threshold
        self.url = _redacted(url) if url else self._describe()
        extra: dict[str, Any] = {}
        if endpoint is not None:
            # Third-party stores (OSS, COS, older MinIO) reject the aws-chunked uploads
            # with trailing checksums that recent botocore sends by default.
            extra = {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
        base: dict[str, Any] = {
            "signature_version": "s3v4",
            "s3": {"addressing_style": addressing},
            "connect_timeout": 10,
            "read_timeout": 60,
            "retries": {"mode": "standard", "max_attempts": 3},
            "max_pool_connections": 20,
        }
        try:
            config = Config(**base, **extra)
        except TypeError:  # botocore before 1.36 has no such options (and sends no such checksums)
            config = Config(**base)
        session = boto3.session.Session()
        self._client = session.client("s3", region_name=region, endpoint_url=endpoint, config=config)
        self._presigner = (
            session.client("s3", region_name=region, endpoint_url=public_endpoint, config=config)
            if public_endpoint
            else self._client
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_threshold,
            max_concurrency=4,
        )

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        """The storage for an ``s3://`` URL (see the module docstring).

        Raises:
            ValueError: naming the (redacted) URL when it is malformed.
        """
        return cls(**parse_s3_url(url), url=url)

    def _describe(self) -> str:
        ep = f"?endpoint={self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{ep}"

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, exc: BaseException, what: str) -> StorageUnavailableError:
        """A clear error for a boto3/botocore failure (no credentials in it)."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        place = self.endpoint or "AWS S3"
        where = f"bucket {self.bucket!r} at {place} (storage URL {self.url})"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            msg = f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        elif isinstance(exc, EndpointConnectionError):
            msg = f"{what}: S3 endpoint {place} is unreachable (storage URL {self.url})"
        elif isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and what.startswith("check")):
                msg = f"{what}: bucket {self.bucket!r} does not exist at {place} (storage URL {self.url})"
            elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                msg = (
                    f"{what}: access to {where} was refused ({code or status}); "
                    "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
                    "and the bucket's permissions"
                )
            else:
                msg = f"{what}: {where} answered {code or status}"
        else:
            msg = f"{what}: {where} failed: {type(exc).__name__}"
        return StorageUnavailableError(msg)

    async def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(exc, what) from None
        except Boto3Error as exc:  # S3UploadFailedError wraps the ClientError
            inner = exc.__cause__ or exc.__context__
            raise self._fail(inner if inner is not None else exc, what) from None

    async def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        k = self._key(key)
        try:
            return await asyncio.to_thread(self._client.head_object, Bucket=self.bucket, Key=k)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(exc, f"reading {key!r}") from None
        except BotoCoreError as exc:
            raise self._fail(exc, f"reading {key!r}") from None

    async def put_file(self, key: str, src: Path) -> int:
        """See :meth:`server.storage.base.Storage.put_file`; ``src`` is removed once stored.

        Raises:
            StorageUnavailableError: when the store refuses or cannot be reached.
        """
        k = self._key(key)
        size = src.stat().st_size
        ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
        await self._call(
            f"storing {key!r}",
            self._client.upload_file,
            str(src),
            self.bucket,
            k,
            ExtraArgs={"ContentType": ctype},
            Config=self._transfer,
        )
        src.unlink(missing_ok=True)
        return size

    async def exists(self, key: str) -> bool:
        """See :meth:`server.storage.base.Storage.exists`."""
        return await self._head(key) is not None

    async def size(self, key: str) -> int | None:
        """See :meth:`server.storage.base.Storage.size`."""
        head = await self._head(key)
        return None if head is None else int(head["ContentLength"])

    async def delete(self, key: str) -> None:
        """See :meth:`server.storage.base.Storage.delete`."""
        await self._call(
            f"deleting {key!r}", self._client.delete_object, Bucket=self.bucket, Key=self._key(key)
        )

    def local_path(self, key: str) -> Path | None:
        """Always ``None``: objects have no filesystem path; read them with :meth:`open_read`."""
        check_key(key)
        return None

    async def open_read(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """See :meth:`server.storage.base.Storage.open_read`."""
        from botocore.exceptions import BotoCoreError, ClientError

        k = self._key(key)
        try:
            resp = await asyncio.to_thread(self._client.get_object, Bucket=self.bucket, Key=k)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFoundError(f"object {key!r} is not in storage") from None
            raise self._fail(exc, f"reading {key!r}") from None
        except BotoCoreError as exc:
            raise self._fail(exc, f"reading {key!r}") from None
        body = resp["Body"]

        def read(n: int) -> bytes:
            try:
                return bytes(body.read(n))
            except BotoCoreError as exc:
                raise self._fail(exc, f"reading {key!r}") from None

        return ChunkReader(read, body.close, chunk_size)

    def signed_url(self, key: str, ttl_s: int, filename: str | None = None) -> str:
        """An absolute presigned GET URL (see :meth:`server.storage.base.Storage.signed_url`).

        ``ttl_s`` is capped at 7 days (SigV4's limit); ``filename`` becomes the
        response's ``Content-Disposition: attachment; filename="..."``.
        """
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{download_name(filename)}"'
        ttl = max(1, min(int(ttl_s), MAX_PRESIGN_S))
        return str(self._presigner.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl))

    async def check(self) -> None:
        """Check that the bucket exists and can be written; create it first when ``create_bucket``.

        A small probe object (``<prefix>.renderfarm-check``) is written and removed.

        Raises:
            StorageUnavailableError: naming the bucket and endpoint when the bucket is missing,
                the endpoint unreachable or the credentials missing or refused.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            await asyncio.to_thread(self._client.head_bucket, Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code not in ("404", "NoSuchBucket", "NotFound") or not self.create_bucket:
                raise self._fail(exc, "checking storage") from None
            kw: dict[str, Any] = {"Bucket": self.bucket}
            if self.region != "us-east-1":
                kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            await self._call("creating the bucket", self._client.create_bucket, **kw)
        except BotoCoreError as exc:
            raise self._fail(exc, "checking storage") from None
        probe = f"{self.prefix}.renderfarm-check"
        await self._call(
            "checking storage (write)", self._client.put_object, Bucket=self.bucket, Key=probe, Body=b"ok"
        )
        await self._call(
            "checking storage (delete)", self._client.delete_object, Bucket=self.bucket, Key=probe
        )
