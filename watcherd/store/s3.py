"""The S3 store (``s3://bucket/prefix``), for AWS and S3-compatible servers (MinIO, R2, rclone).

This is the only module that imports boto3 (and botocore under it); :func:`watcherd.store.open_store`
imports it only when the URL is an S3 one, so a local-store daemon never loads the AWS SDK. The
client comes from a boto3 session: boto3's default credential chain (environment keys, shared
config, IRSA web identity refreshed by botocore, instance roles).

How the :class:`~watcherd.store.base.Store` promises are kept here:

- **Conditional writes** are S3's own: ``If-None-Match: *`` to create, ``If-Match: <etag>`` to
  replace. The version token is the ETag. A 412 (or a 409 ConditionalRequestConflict, or a 404 on
  ``If-Match`` when the object is gone) means another writer won: :class:`PreconditionFailed`.
- **Retries are botocore's** (standard mode). A retried write can meet its own earlier attempt —
  the first PUT landed but its response was lost — and then gets a 412. Every write therefore
  carries a random token in its metadata; a 412 on an object that carries our token is our win.
- **No partial objects**: a PUT or a CompleteMultipartUpload is atomic in S3. Bundles are read
  from a spooled local file, hashed while they are read, and the upload is only completed when
  the bytes sent are the bytes promised (size and sha256). Failed multipart uploads are aborted.
- **Servers that ignore conditional headers** are detected once by a probe
  (:meth:`S3Store.probe_conditional_writes`); on them the store falls back to check-then-write,
  which narrows but does not close the race, and says so in the log and ``conditional_writes``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import boto3.session
import urllib3.exceptions
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from watcherd import log
from watcherd.config import S3Config, StoreURL
from watcherd.errors import ObjectMissing, PreconditionFailed, StoreError, StoreUnavailable
from watcherd.store.base import Blob, ObjectInfo, check_name

_log = log.get(__name__)

MiB = 2**20
#: S3 allows at most 10,000 parts; parts other than the last must be at least 5 MiB.
_MAX_PARTS = 10_000
_MIN_PART = 5 * MiB
_CHUNK = 1 * MiB
#: The metadata key (``x-amz-meta-watcherd-write``) holding each write's random token.
_TOKEN_META = "watcherd-write"
_SHA256_META = "watcherd-sha256"
#: Objects under this name prefix are the store's own (the probe); a workspace key can never
#: start with a dot, so they cannot collide with one and :meth:`S3Store.list` hides them.
_PROBE_PREFIX = ".watcherd-probe-"

_THROTTLING = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
})
_TRANSIENT = frozenset({"RequestTimeout", "RequestTimeoutException", "InternalError",
                        "ServiceUnavailable", "InternalServerError", "OperationAborted"})
_EXPIRED = frozenset({"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired",
                      "RequestExpired", "RequestTimeTooSkewed"})
_PRECONDITION = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
_NOT_IMPLEMENTED = frozenset({"NotImplemented", "501"})
_WRONG_REGION = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed",
                           "IllegalLocationConstraintException"})
#: The IAM action each client call needs, for "access denied" messages.
_ACTIONS = {
    "get_object": "s3:GetObject", "head_object": "s3:GetObject", "put_object": "s3:PutObject",
    "create_multipart_upload": "s3:PutObject", "upload_part": "s3:PutObject",
    "complete_multipart_upload": "s3:PutObject", "abort_multipart_upload": "s3:AbortMultipartUpload",
    "delete_object": "s3:DeleteObject", "list_objects_v2": "s3:ListBucket",
}
#: Errors while streaming a response body; botocore retries requests, not bodies.
_STREAM_ERRORS = (ResponseStreamingError, IncompleteReadError, HTTPClientError,
                  urllib3.exceptions.HTTPError, OSError)


class S3Store:
    """A :class:`~watcherd.store.base.Store` in an S3 bucket, under the URL's prefix.

    ``connect_timeout``, ``read_timeout``, ``part_size``, ``multipart_threshold`` and
    ``max_concurrency`` are deliberately not config keys: the defaults suit S3 and the
    S3-compatibles, and tests and benchmarks need to change them. ``environ`` (default
    ``os.environ``) is where the region comes from when the config has none. Nothing here touches
    the network: credentials are resolved, and the conditional-write probe runs, on first use.
    """

    conditional_writes: bool | None = None
    _list_page_size = 1000  # S3's maximum; tests lower it to see pagination

    def __init__(self, url: StoreURL, cfg: S3Config, *, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0, part_size: int = 8 * MiB,
                 multipart_threshold: int = 8 * MiB, max_concurrency: int = 4,
                 environ: Mapping[str, str] | None = None) -> None:
        if url.scheme != "s3" or not url.bucket:
            raise StoreError(f"{url}: not an s3://bucket/prefix URL")
        if part_size < _MIN_PART:
            raise ValueError(f"part_size must be at least {_MIN_PART} bytes (an S3 limit)")
        self.url = str(url)
        self.bucket = url.bucket
        self.prefix = url.prefix
        self.cfg = cfg
        self.conditional_writes = None
        self._send_conditions = True  # False when the server rejects the headers outright
        self._part_size = part_size
        self._threshold = max(multipart_threshold, 1)
        self._concurrency = max(1, max_concurrency)
        self._max_attempts = cfg.max_attempts
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._probe_lock = threading.Lock()
        self._creds_logged = False
        environ = os.environ if environ is None else environ
        self._endpoint = cfg.endpoint_url or None

        self._session = boto3.session.Session()
        region, region_source = _region(cfg, environ, self._session)
        if environ.get("AWS_DEFAULT_REGION") and environ.get("AWS_REGION") and \
                environ["AWS_DEFAULT_REGION"] != environ["AWS_REGION"] and not cfg.region:
            _log.warning("s3.region_mismatch", aws_default_region=environ["AWS_DEFAULT_REGION"],
                         aws_region=environ["AWS_REGION"], used=region,
                         hint="set store.s3.region to choose explicitly")
        self.region = region
        boto_config = BotoConfig(
            region_name=region,
            # total_max_attempts counts the first try, as AWS_MAX_ATTEMPTS does; the Config
            # key "max_attempts" would count retries only (8 would mean 9 requests).
            retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * self._concurrency + 2),
            s3={"addressing_style": "path" if cfg.force_path_style else "auto"},
            # botocore >= 1.36 adds CRC checksums by default, which several S3-compatibles
            # reject; we send our own SHA-256 checksums instead (real S3 verifies them).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="watcherd",
        )
        try:
            self._client = self._session.client("s3", endpoint_url=self._endpoint,
                                                config=boto_config)
        except BotoCoreError as exc:
            raise StoreError(f"{self.url}: cannot set up the S3 client: "
                             f"{_one_line(str(exc))}") from None
        self._client.meta.events.register("before-sign.s3", self._register_secrets)
        _log.info("s3.client", bucket=self.bucket, prefix=self.prefix,
                  endpoint=self._endpoint or "aws", region=region, region_source=region_source,
                  addressing="path" if cfg.force_path_style else "auto",
                  sse=cfg.sse or None, storage_class=cfg.storage_class or None,
                  max_attempts=cfg.max_attempts)

    # -- Store -----------------------------------------------------------------------------------

    def read(self, name: str, *, limit: int | None = None) -> Blob | None:
        key = self._key(name)
        try:
            resp = self._call("get_object", key, Bucket=self.bucket, Key=key)
            data = self._read_body(resp, key, limit)
        except ObjectMissing:
            return None
        return Blob(data, resp["ETag"])

    def write(self, name: str, data: bytes, *, if_version: str | None) -> str:
        key = self._key(name)
        self._ensure_probed(name)
        token = uuid.uuid4().hex
        args = self._put_args(token, bundle=False)
        if self.conditional_writes is False:
            self._check_then_write(key, if_version)
        if self._send_conditions:
            if if_version is None:
                args["IfNoneMatch"] = "*"
            else:
                args["IfMatch"] = if_version
        try:
            resp = self._call("put_object", key, Bucket=self.bucket, Key=key, Body=data,
                              ContentLength=len(data), ChecksumSHA256=_b64_sha256(data), **args)
        except PreconditionFailed:
            etag = self._ours(key, token)
            if etag is None:
                raise
            return etag
        except ObjectMissing:
            # If-Match on an object that is gone: S3 answers 404, which is a lost race too.
            raise PreconditionFailed(f"{self._where(key)} no longer exists") from None
        return resp["ETag"]

    def upload(self, name: str, path: Path, *, size: int, sha256: str) -> None:
        key = self._key(name)
        self._ensure_probed(name)
        token = uuid.uuid4().hex
        started = time.monotonic()
        try:
            src = open(path, "rb")
        except OSError as exc:
            raise StoreError(f"cannot upload {path} to {self._where(key)}: "
                             f"{exc.strerror or exc}") from None
        with src:
            if size <= self._threshold:
                parts = 1
                self._put_small(key, src, size, sha256, token)
            else:
                parts = self._put_multipart(key, src, size, sha256, token)
        self._check_uploaded(key, size, token)
        _log.debug("s3.upload", key=key, bytes=size, parts=parts,
                   duration_ms=round((time.monotonic() - started) * 1000))

    def download(self, name: str, dest: Path) -> int:
        key = self._key(name)
        head = self._call("head_object", key, Bucket=self.bucket, Key=key)
        size, etag = int(head["ContentLength"]), str(head["ETag"])
        ranges = [(a, min(a + self._part_size, size)) for a in range(0, size, self._part_size)]
        try:
            out = open(dest, "wb")
        except OSError as exc:
            raise StoreError(f"cannot download {self._where(key)} to {dest}: "
                             f"{exc.strerror or exc}") from None
        with out:
            fd = out.fileno()
            if len(ranges) <= 1 or self._concurrency == 1:
                for a, b in ranges:
                    self._fetch_range(fd, key, etag, a, b)
            else:
                # Ranged GETs in parallel, each pinned to the ETag seen by the HEAD, written
                # in place: the same shape as boto3's download_file, with our errors.
                with ThreadPoolExecutor(self._concurrency, thread_name_prefix="s3-get") as pool:
                    futures = [pool.submit(self._fetch_range, fd, key, etag, a, b)
                               for a, b in ranges]
                    wait(futures, return_when=FIRST_EXCEPTION)
                    for f in futures:
                        f.cancel()
                    for f in futures:
                        if not f.cancelled() and f.exception() is not None:
                            raise f.exception()  # type: ignore[misc]
        return size

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._call("delete_object", key, Bucket=self.bucket, Key=key)

    def list(self, prefix: str) -> list[ObjectInfo]:
        # Directory semantics, like the local store: "k" lists k/..., never k2/...
        sub = prefix.strip("/")
        if sub:
            self._key(sub)
        root = f"{self.prefix}/" if self.prefix else ""
        key_prefix = root + (sub + "/" if sub else "")
        found: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key_prefix,
                                      "MaxKeys": self._list_page_size}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list_objects_v2", key_prefix, **kwargs)
            for obj in resp.get("Contents", ()):
                rel = obj["Key"][len(root):]
                try:
                    check_name(rel)  # hides the probe and anything not written by a store
                except ValueError:
                    continue
                found.append(ObjectInfo(rel, obj["Size"]))
            if not resp.get("IsTruncated"):
                break
            token = resp["NextContinuationToken"]
        return sorted(found, key=lambda o: o.name)

    def close(self) -> None:
        self._client.close()

    def abort_stale_uploads(self, prefix: str, older_than: float) -> int:
        """Abort the multipart uploads under ``prefix`` started more than ``older_than`` seconds
        ago; how many. A daemon killed mid-upload leaves its parts behind, billed and invisible
        in listings (S3 ListMultipartUploads / AbortMultipartUpload)."""
        key_prefix = self._raw_key(prefix.rstrip("/")) + "/"
        cutoff = time.time() - older_than
        aborted = 0
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key_prefix}
        while True:
            resp = self._call("list_multipart_uploads", key_prefix, **kwargs)
            for upload in resp.get("Uploads", ()):
                started = upload.get("Initiated")
                if started is not None and started.timestamp() < cutoff:
                    self._abort(upload["Key"], upload["UploadId"])
                    aborted += 1
            if not resp.get("IsTruncated"):
                return aborted
            kwargs.update(KeyMarker=resp.get("NextKeyMarker"),
                          UploadIdMarker=resp.get("NextUploadIdMarker"))

    # -- conditional-write probe -----------------------------------------------------------------

    def probe_conditional_writes(self, near: str | None = None) -> bool:
        """Find out (again) whether the server honours ``If-None-Match``/``If-Match`` on PUT.

        Writes a probe object twice with ``If-None-Match: *`` (the second must be refused), then
        once with ``If-Match`` on a wrong ETag (must be refused), and deletes it. The probe sits
        beside the object ``near`` (e.g. ``acme/app/manifest.json`` -> ``<prefix>/acme/app/
        .watcherd-probe-<host>-<random>``), so an IAM policy scoped to one workspace key allows
        it; without ``near`` it sits at the top of the prefix. The result is kept in
        :attr:`conditional_writes`. It runs by itself before the store's first write, so
        read-only users (``restore``) never pay for it; StoreError if the probe cannot be written.
        """
        probe = f"{_PROBE_PREFIX}{_safe_host()}-{uuid.uuid4().hex[:12]}"
        folder = near.rpartition("/")[0] if near else ""
        if folder:
            self._key(folder)
        key = self._raw_key(f"{folder}/{probe}" if folder else probe)
        args = self._put_args(uuid.uuid4().hex, bundle=False)
        honoured = True
        reason = ""
        try:
            self._send_conditions = True
            try:
                self._call("put_object", key, Bucket=self.bucket, Key=key, Body=b"probe 1",
                           IfNoneMatch="*", **args)
            except StoreError as exc:
                if not _not_implemented(exc):
                    raise
                # Conclusive only if the same PUT without the header works (else it is
                # something else, e.g. an SSE setting the server refuses: let that surface).
                self._call("put_object", key, Bucket=self.bucket, Key=key, Body=b"probe 1", **args)
                honoured, reason = False, "the server rejects conditional headers"
                self._send_conditions = False
            if honoured:
                for attempt, extra in (("If-None-Match", {"IfNoneMatch": "*"}),
                                       ("If-Match", {"IfMatch": '"0123456789abcdef0123456789abcdef"'})):
                    try:
                        self._call("put_object", key, Bucket=self.bucket, Key=key,
                                   Body=b"probe 2", **extra, **args)
                    except (PreconditionFailed, ObjectMissing):
                        continue
                    honoured, reason = False, f"the server ignored {attempt}"
                    break
        finally:
            try:
                self._call("delete_object", key, Bucket=self.bucket, Key=key)
            except StoreError as exc:
                _log.warning("s3.probe_cleanup_failed", key=key, error=str(exc))
        self.conditional_writes = honoured
        if honoured:
            _log.info("s3.conditional_writes", supported=True, bucket=self.bucket)
        else:
            _log.warning("s3.conditional_writes", supported=False, bucket=self.bucket,
                         endpoint=self._endpoint or "aws", reason=reason,
                         hint="split-brain protection is best-effort on this server: two pods "
                              "writing the same store.key at the same moment can overwrite "
                              "each other")
        return honoured

    def _ensure_probed(self, name: str) -> None:
        if self.conditional_writes is None:
            with self._probe_lock:
                if self.conditional_writes is None:
                    try:
                        self.probe_conditional_writes(near=name)
                    except StoreError as exc:
                        # The write itself will say what is wrong, naming its own key; the
                        # headers are still sent, and the probe runs again next time.
                        _log.warning("s3.probe_failed", bucket=self.bucket, error=str(exc))

    def _check_then_write(self, key: str, if_version: str | None) -> None:
        """Best-effort preconditions for servers that ignore the headers (racy, but narrow)."""
        try:
            current: str | None = self._call("head_object", key, Bucket=self.bucket, Key=key)["ETag"]
        except ObjectMissing:
            current = None
        if if_version is None and current is not None:
            raise PreconditionFailed(f"{self._where(key)} already exists")
        if if_version is not None and current != if_version:
            raise PreconditionFailed(f"{self._where(key)} changed since it was read")

    # -- uploads ---------------------------------------------------------------------------------

    def _put_small(self, key: str, src: Any, size: int, sha256: str, token: str) -> None:
        try:
            data = src.read(size + 1)
        except OSError as exc:
            raise StoreError(f"cannot read the file to upload to {self._where(key)}: "
                             f"{exc.strerror or exc}") from None
        _check_source(self._where(key), len(data), hashlib.sha256(data).hexdigest(), size, sha256)
        args = self._put_args(token, bundle=True, sha256=sha256)
        if self.conditional_writes is False:
            self._check_then_write(key, None)
        if self._send_conditions:
            args["IfNoneMatch"] = "*"
        try:
            # The checksum is the one promised, not the one computed: real S3 then refuses
            # the PUT if the bytes differ from what the manifest will say.
            self._call("put_object", key, Bucket=self.bucket, Key=key, Body=data,
                       ContentLength=size, ChecksumSHA256=_b64(bytes.fromhex(sha256)), **args)
        except PreconditionFailed:
            if self._ours(key, token) is None:
                raise PreconditionFailed(f"{self._where(key)} already exists") from None

    def _put_multipart(self, key: str, src: Any, size: int, sha256: str, token: str) -> int:
        # Fail fast rather than send hundreds of MiB to be refused at the end (the completion
        # is still conditional: this HEAD only saves bandwidth).
        try:
            self._call("head_object", key, Bucket=self.bucket, Key=key)
            raise PreconditionFailed(f"{self._where(key)} already exists")
        except ObjectMissing:
            pass
        part_size = self._part_size
        while -(-size // part_size) > _MAX_PARTS:
            part_size *= 2
        args = self._put_args(token, bundle=True, sha256=sha256)
        created = self._call("create_multipart_upload", key, Bucket=self.bucket, Key=key,
                             ChecksumAlgorithm="SHA256", **args)
        upload_id = created["UploadId"]
        try:
            parts = self._send_parts(key, upload_id, src, size, sha256, part_size)
            complete: dict[str, Any] = {}
            if self.conditional_writes is False:
                self._check_then_write(key, None)
            if self._send_conditions:
                complete["IfNoneMatch"] = "*"
            try:
                self._call("complete_multipart_upload", key, Bucket=self.bucket, Key=key,
                           UploadId=upload_id, MultipartUpload={"Parts": parts}, **complete)
            except PreconditionFailed:
                if self._ours(key, token) is None:
                    raise PreconditionFailed(f"{self._where(key)} already exists") from None
        except BaseException:
            self._abort(key, upload_id)
            raise
        return len(parts)

    def _send_parts(self, key: str, upload_id: str, src: Any, size: int, sha256: str,
                    part_size: int) -> list[dict[str, Any]]:
        """Read the file once, in order (hashing it), and upload its parts concurrently.

        At most ``max_concurrency`` parts are in memory at once. The whole-file hash is compared
        with the promised one before the caller completes the upload, so a file that changed
        while it was read is never published.
        """
        digest = hashlib.sha256()
        read = 0
        slots = threading.BoundedSemaphore(self._concurrency)
        failed = threading.Event()
        futures: list[Future[dict[str, Any]]] = []

        def send(number: int, data: bytes) -> dict[str, Any]:
            try:
                checksum = _b64_sha256(data)
                resp = self._call("upload_part", key, Bucket=self.bucket, Key=key,
                                  UploadId=upload_id, PartNumber=number, Body=data,
                                  ContentLength=len(data), ChecksumSHA256=checksum)
                return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}
            except BaseException:
                failed.set()
                raise
            finally:
                slots.release()

        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="s3-put") as pool:
            try:
                while not failed.is_set():
                    slots.acquire()  # bounds the parts held in memory
                    try:
                        data = src.read(part_size)
                    except OSError as exc:
                        raise StoreError(f"cannot read the file to upload to "
                                         f"{self._where(key)}: {exc.strerror or exc}") from None
                    finally:
                        slots.release()
                    digest.update(data)
                    read += len(data)
                    if not data or read > size:
                        break  # the end, or a file longer than promised (refused below)
                    slots.acquire()
                    futures.append(pool.submit(send, len(futures) + 1, data))
                    del data
            except BaseException:
                failed.set()
                raise
            finally:
                if failed.is_set():
                    for f in futures:
                        f.cancel()  # parts not started yet; running ones finish
        for f in futures:
            if not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        _check_source(self._where(key), read, digest.hexdigest(), size, sha256)
        return [f.result() for f in futures]

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._call("abort_multipart_upload", key, Bucket=self.bucket, Key=key,
                       UploadId=upload_id)
        except StoreError as exc:
            _log.warning("s3.abort_failed", key=key, upload_id=upload_id, error=str(exc),
                         hint="the parts stay billed until an AbortIncompleteMultipartUpload "
                              "lifecycle rule removes them")

    def _check_uploaded(self, key: str, size: int, token: str) -> None:
        """HEAD after the upload: the size S3 stored is the size sent. A wrong one (a broken
        S3-compatible) is deleted when it is ours, so the next attempt can use the name."""
        head = self._call("head_object", key, Bucket=self.bucket, Key=key)
        if head["ContentLength"] == size:
            return
        mine = head.get("Metadata", {}).get(_TOKEN_META) == token
        if mine:
            self._call("delete_object", key, Bucket=self.bucket, Key=key)
        raise StoreError(f"{self._where(key)}: the server stored {head['ContentLength']} bytes, "
                         f"{size} were sent" + ("; the object was deleted" if mine else ""))

    def _ours(self, key: str, token: str) -> str | None:
        """The object's ETag if ``key`` holds the write with ``token`` (a retry met itself)."""
        try:
            head = self._call("head_object", key, Bucket=self.bucket, Key=key)
        except StoreError:
            return None  # gone, or not readable with these credentials: the write lost
        if head.get("Metadata", {}).get(_TOKEN_META) == token:
            _log.info("s3.retry_met_own_write", key=key)
            return str(head["ETag"])
        return None

    def _put_args(self, token: str, *, bundle: bool, sha256: str | None = None) -> dict[str, Any]:
        meta = {_TOKEN_META: token}
        if sha256:
            meta[_SHA256_META] = sha256
        args: dict[str, Any] = {"Metadata": meta}
        if self.cfg.sse:
            args["ServerSideEncryption"] = self.cfg.sse
            if self.cfg.sse == "aws:kms" and self.cfg.kms_key_id:
                args["SSEKMSKeyId"] = self.cfg.kms_key_id
        if bundle and self.cfg.storage_class:
            args["StorageClass"] = self.cfg.storage_class
        return args

    # -- downloads -------------------------------------------------------------------------------

    def _fetch_range(self, fd: int, key: str, etag: str, start: int, end: int) -> None:
        """Write bytes [start, end) of ``key`` at the same offsets of ``fd``, resuming a broken
        stream where it stopped (botocore retries requests, not response bodies)."""
        pos = start
        failures = 0
        while pos < end:
            try:
                resp = self._call("get_object", key, Bucket=self.bucket, Key=key, IfMatch=etag,
                                  Range=f"bytes={pos}-{end - 1}")
            except PreconditionFailed:
                raise StoreUnavailable(f"{self._where(key)} changed while it was downloaded; "
                                       "try again") from None
            body = resp["Body"]
            chunks = body.iter_chunks(_CHUNK)
            try:
                while True:
                    try:
                        chunk = next(chunks)
                    except StopIteration:
                        break
                    if pos + len(chunk) > end:
                        raise StoreError(f"{self._where(key)}: the server sent more bytes than "
                                         "asked for")
                    try:
                        os.pwrite(fd, chunk, pos)
                    except OSError as exc:
                        raise StoreError(f"cannot write the download of {self._where(key)}: "
                                         f"{exc.strerror or exc}") from None
                    pos += len(chunk)
            except _STREAM_ERRORS as exc:
                failures += 1
                if failures >= self._max_attempts:
                    raise StoreUnavailable(f"cannot download {self._where(key)}: the connection "
                                           f"broke {failures} times ({_one_line(str(exc))})") from None
                _log.warning("s3.download_resume", key=key, offset=pos, attempt=failures,
                             error=_one_line(str(exc)))
                time.sleep(min(0.05 * 2**failures, 2.0))
            finally:
                body.close()

    def _read_body(self, resp: Mapping[str, Any], key: str, limit: int | None = None) -> bytes:
        try:
            if limit is None:
                return bytes(resp["Body"].read())
            data = bytes(resp["Body"].read(limit + 1))  # no more of an oversized object
            resp["Body"].close()
            return data
        except _STREAM_ERRORS as exc:
            # Small objects (manifests): the caller's own retry re-reads the whole object.
            raise StoreUnavailable(f"cannot read {self._where(key)}: the connection broke "
                                   f"({_one_line(str(exc))})") from None

    # -- plumbing --------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        try:
            check_name(name)
        except ValueError as exc:
            raise StoreError(f"{self.url}: {exc}") from None
        return self._raw_key(name)

    def _raw_key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        """One client call, its failure turned into a one-line :class:`StoreError`."""
        try:
            return getattr(self._client, op)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, op, key) from None

    def _translate(self, exc: Exception, op: str, key: str) -> StoreError:
        where = self._where(key)
        endpoint = self._endpoint or "the AWS S3 endpoint"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            meta = exc.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode") or 0)
            code = str(err.get("Code") or status)
            message = _one_line(str(err.get("Message") or ""))
            tries = int(meta.get("RetryAttempts") or 0) + 1
            after = f" after {tries} attempts" if tries > 1 else ""
            if code in _PRECONDITION or status == 412 or (status == 409 and "Condition" in code):
                return PreconditionFailed(f"{where}: another writer changed it first ({code})")
            if code == "NoSuchBucket":
                return StoreError(f"{self.url}: the bucket {self.bucket!r} does not exist on "
                                  f"{endpoint} (check store.url, store.s3.region and "
                                  "store.s3.endpoint_url)")
            if code in ("NoSuchKey", "404", "NoSuchUpload") or status == 404:
                return ObjectMissing(f"{where} does not exist")
            if code in ("AccessDenied", "403", "AllAccessDisabled", "AccessDeniedException"):
                action = _ACTIONS.get(op, op)
                hint = "check the IAM policy of these credentials and the bucket policy"
                if op in ("get_object", "head_object"):
                    hint += "; reading a missing object also needs s3:ListBucket on the bucket"
                if "kms" in message.lower():
                    hint = "the KMS key policy must allow kms:GenerateDataKey and kms:Decrypt"
                return StoreError(f"access denied: {action} on {where} ({hint})")
            if code == "InvalidAccessKeyId":
                return StoreError(f"{where}: the access key id is not known to {endpoint} "
                                  "(InvalidAccessKeyId): check the credentials and that they "
                                  "belong to this endpoint")
            if code == "SignatureDoesNotMatch":
                return StoreError(f"{where}: the request signature does not match "
                                  "(SignatureDoesNotMatch): the secret access key is wrong for "
                                  "this access key id")
            if code in _EXPIRED:
                return StoreError(f"{where}: the AWS credentials have expired or the clock is "
                                  f"off ({code}): refresh them (IRSA and instance roles refresh "
                                  "by themselves; static session tokens do not)")
            if code in _WRONG_REGION:
                region = exc.response.get("Error", {}).get("Region") or \
                    meta.get("HTTPHeaders", {}).get("x-amz-bucket-region", "")
                return StoreError(f"{self.url}: the bucket is in another region"
                                  + (f" ({region})" if region else "")
                                  + f" than {self.region}: set store.s3.region")
            if code in _THROTTLING or status == 429:
                return StoreUnavailable(f"{where}: S3 is throttling requests ({code}){after}; "
                                        "retry later")
            if code in _TRANSIENT or status >= 500:
                return StoreUnavailable(f"{where}: the server answered {status} {code}{after}"
                                        + (f": {message}" if message else ""))
            return StoreError(f"{where}: {op} failed: {code}"
                              + (f": {message}" if message else ""))
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"{self.url}: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, IRSA (AWS_ROLE_ARN + "
                              "AWS_WEB_IDENTITY_TOKEN_FILE) or give the host an instance role")
        if isinstance(exc, PartialCredentialsError):
            return StoreError(f"{self.url}: incomplete AWS credentials: {_one_line(str(exc))}")
        if isinstance(exc, CredentialRetrievalError):
            return StoreError(f"{self.url}: cannot get AWS credentials: {_one_line(str(exc))}")
        if isinstance(exc, NoRegionError):
            return StoreError(f"{self.url}: no AWS region: set store.s3.region or AWS_REGION")
        if isinstance(exc, EndpointConnectionError):
            reason = _connect_reason(exc)
            return StoreUnavailable(f"{where}: cannot connect to {endpoint} ({reason}) after "
                                    f"{self._max_attempts} attempts: check store.s3.endpoint_url "
                                    "and the network")
        if isinstance(exc, ConnectTimeoutError):
            return StoreUnavailable(f"{where}: connecting to {endpoint} timed out "
                                    f"({self._connect_timeout:g}s) after {self._max_attempts} "
                                    "attempts: check store.s3.endpoint_url and the network")
        if isinstance(exc, ReadTimeoutError):
            return StoreUnavailable(f"{where}: {endpoint} did not answer within "
                                    f"{self._read_timeout:g}s (read timeout) after "
                                    f"{self._max_attempts} attempts")
        if isinstance(exc, (ConnectionClosedError, HTTPClientError)):
            return StoreUnavailable(f"{where}: the connection to {endpoint} broke "
                                    f"({_one_line(str(exc))}) after {self._max_attempts} attempts")
        if isinstance(exc, BotoCoreError) and "connect" in str(exc).lower():
            return StoreUnavailable(f"{where}: {_one_line(str(exc))}")
        return StoreError(f"{where}: {op} failed: {_one_line(str(exc))}")

    def _register_secrets(self, **_: Any) -> None:
        """Mask the credentials in every log line; they may be refreshed at any time (IRSA)."""
        creds = self._session.get_credentials()
        if creds is None:
            return
        frozen = creds.get_frozen_credentials()
        log.add_secret(frozen.secret_key)
        log.add_secret(frozen.token)
        if not self._creds_logged:
            self._creds_logged = True
            _log.info("s3.credentials", source=getattr(creds, "method", "unknown"))


def _region(cfg: S3Config, environ: Mapping[str, str], session: Any) -> tuple[str, str]:
    """The region and where it came from. botocore itself reads only AWS_DEFAULT_REGION; EKS
    and most other tools set AWS_REGION, so both count (the order of DESIGN.md)."""
    if cfg.region:
        return cfg.region, "config"
    for var in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        if environ.get(var):
            return environ[var], var
    try:
        profile_region = session.region_name
    except BotoCoreError:
        profile_region = None
    if profile_region:
        return str(profile_region), "shared config"
    return "us-east-1", "default"


def _check_source(where: str, got_size: int, got_sha: str, size: int, sha256: str) -> None:
    if got_size != size or got_sha != sha256.lower():
        raise StoreError(f"{where}: the file to upload does not match its checksum "
                         f"({got_size} bytes, expected {size}); nothing was published")


def _not_implemented(exc: StoreError) -> bool:
    text = str(exc)
    return any(code in text for code in _NOT_IMPLEMENTED) or "InvalidArgument" in text


def _connect_reason(exc: EndpointConnectionError) -> str:
    text = str(getattr(exc, "kwargs", {}).get("error", "")) or str(exc)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low or \
            "temporary failure in name resolution" in low or "getaddrinfo" in low:
        return "the host name does not resolve"
    if "unreachable" in low:
        return "network unreachable"
    return _one_line(text)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64_sha256(data: bytes) -> str:
    return _b64(hashlib.sha256(data).digest())


def _one_line(text: str) -> str:
    return log.redact(" ".join(text.split()))[:300]


def _safe_host() -> str:
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
    return host[:40] or "host"


__all__ = ["S3Store"]
