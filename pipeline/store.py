"""Where shards live: a local path, ``s3://bucket/key`` or ``http(s)://host/path``.

    store = Store(Policy(attempts=6), cache=ShardCache("/local/cache", 500 << 30))
    manifest_bytes = store.read("s3://bucket/imagenet/train/manifest.json")
    with store.open("s3://bucket/imagenet/train/train-000000.tar", 1536, 2_000_000) as f:
        ...                                        # a byte range, retried and resumed

Any other ``scheme://`` is refused (:func:`check_url`), never taken as a path.

S3 goes through boto3 (the ``tntpipe[s3]`` extra), which reads the endpoint, region
and credentials the standard way (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``~/.aws/config``), so one config runs against AWS, MinIO or Ceph.
Why boto3 and not s3fs or ``pipe:aws s3 cp``: it is the one client every S3-compatible
store is tested against, it does ranged GETs and multipart uploads directly, and it
has no async stack (s3fs needs aiobotocore, pinned to narrow botocore versions). HTTP
goes through the standard library (urllib): a ranged GET is all the loader needs.

Retries are ours, not botocore's (whose ``max_attempts`` is set to 1): botocore only
retries until the response headers arrive, and a shard body that is reset, cut short
or stalls half-way would end the shard. :class:`RangeReader` retries every transient
failure (connection refused or reset, 5xx, 429/503 SlowDown, a read past
``Policy.read_timeout``, fewer bytes than asked for) with exponential backoff and full
jitter, and resumes from the byte it had reached with a new ranged GET, so the bytes
it returns are exactly the object's. After ``Policy.attempts`` failures in a row it
raises :class:`ReadFailed`, naming the URL, the byte and the last error. Permanent
failures (404, 403, a missing bucket, no credentials) raise :class:`StoreError` at once.

The optional :class:`ShardCache` keeps whole shards on local disk, checked against the
manifest's sha256, evicted least recently used within a byte limit, shared by the
ranks of a node (a lock file per shard: one download, the others wait and reuse it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Callable

from pipeline.atomic import replacing, write_atomic
from pipeline.errors import InputError

# The retries' jitter draws from its own generator: a request made in a background thread
# (the shard read ahead, pipeline/manifest.py) must not move the global `random` state
# that seeds each sample's augmentation in the thread decoding it.
_JITTER = random.Random()
os.register_at_fork(after_in_child=_JITTER.seed)  # workers forked together do not retry in step
log = logging.getLogger("tntpipe.store")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
REMOTE = ("s3", "http", "https")


class StoreError(InputError):
    """A permanent failure (missing object or bucket, no access, an unsupported URL)."""


class NotFound(StoreError):
    """The object (or, from HEAD, maybe its bucket) does not exist."""


class ReadFailed(OSError):
    """A read that still failed after every retry."""


class _Transient(Exception):
    """A failure worth retrying."""


class _Mismatch(Exception):
    """A download whose bytes differ from the manifest's sha256."""


def scheme(url: str) -> str:
    """``s3``, ``http``, ``https``, ``pipe`` (webdataset's shell pipes) or ``""`` (a local
    path; ``file://`` too). Anything else is refused with a one-line error."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(url)
    if not m:
        return ""
    s = m.group(1).lower()
    if s == "file":
        return ""
    if s not in REMOTE:
        raise StoreError(
            f"unsupported URL scheme {s}:// in {url} (supported: local paths, s3://, http://, https://; "
            f"for other stores use an S3-compatible endpoint via AWS_ENDPOINT_URL)"
        )
    return s


def check_url(url: str) -> str:
    """``url`` if its scheme is supported (see :func:`scheme`)."""
    scheme(url)
    return url


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join(base: str, *names: str) -> str:
    """Join path parts: with ``/`` for URLs, ``os.path.join`` for local paths."""
    if scheme(base):
        return "/".join([base.rstrip("/")] + [n.strip("/") for n in names])
    return os.path.join(local_path(base), *names)


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise StoreError(f"no bucket in {url}")
    return bucket, key


@dataclasses.dataclass(frozen=True)
class Policy:
    """How hard to try: ``attempts`` tries per request (each a fresh ranged GET from the
    byte reached), sleeping ``backoff * 2**k`` seconds (full jitter, at most
    ``max_backoff``) between them; ``connect_timeout``/``read_timeout`` per socket wait."""

    attempts: int = 6
    backoff: float = 0.5
    max_backoff: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def delay(self, k: int) -> float:
        return _JITTER.uniform(0, min(self.max_backoff, self.backoff * 2**k))


# ---------------------------------------------------------------- backends


_clients: dict = {}


def _s3(policy: Policy):
    """One boto3 client per process and policy (clients must not cross a fork)."""
    key = (os.getpid(), policy.connect_timeout, policy.read_timeout)
    if key not in _clients:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError("s3:// URLs need boto3: pip install 'tntpipe[s3]' (or pip install boto3)") from None
        config = Config(
            connect_timeout=policy.connect_timeout,
            read_timeout=policy.read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=32,
        )
        _clients[key] = boto3.session.Session().client("s3", config=config)
    return _clients[key]


def _classify(exc: BaseException, url: str) -> BaseException:
    """``_Transient`` for what a retry can fix, :class:`StoreError` for what it cannot."""
    try:
        import botocore.exceptions as bx
    except ImportError:
        bx = None
    if isinstance(exc, (StoreError, _Transient)):
        return exc
    if bx is not None and isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code, status = str(err.get("Code", "")), int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if (
            status >= 500
            or status in (408, 429)
            or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
        ):
            return _Transient(f"HTTP {status} {code}")
        if code in ("NoSuchBucket",):
            return StoreError(f"bucket of {url} does not exist (NoSuchBucket)")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{url} not found")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
            return StoreError(
                f"access to {url} denied ({code}): check AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID)"
            )
        return StoreError(f"{url}: HTTP {status} {code}: {err.get('Message', '')}")
    if bx is not None and isinstance(exc, bx.NoCredentialsError):
        return StoreError(f"no AWS credentials for {url} (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if bx is not None and isinstance(
        exc,
        (
            bx.ConnectionError,
            bx.HTTPClientError,
            bx.IncompleteReadError,
            bx.ResponseStreamingError,
            bx.ReadTimeoutError,
        ),
    ):
        return _Transient(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code >= 500 or exc.code in (408, 429):
            return _Transient(f"HTTP {exc.code} {exc.reason}")
        if exc.code == 404:
            return NotFound(f"{url} not found")
        return StoreError(f"{url}: HTTP {exc.code} {exc.reason}")
    if isinstance(exc, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError)):
        return _Transient(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE):
        return _Transient(f"{type(exc).__name__}: {exc}")
    try:
        import urllib3.exceptions as ux

        if isinstance(exc, (ux.HTTPError,)):
            return _Transient(f"{type(exc).__name__}: {exc}")
    except ImportError:
        pass
    import http.client

    if isinstance(exc, http.client.HTTPException):
        return _Transient(f"{type(exc).__name__}: {exc}")
    return exc


def _open_raw(url: str, start: int, end: int | None, policy: Policy):
    """A response body for bytes ``[start, end)`` (``end`` None: to the object's end)."""
    s = scheme(url)
    rng = f"bytes={start}-" + ("" if end is None else str(end - 1))
    if s == "s3":
        bucket, key = _split_s3(url)
        return _s3(policy).get_object(Bucket=bucket, Key=key, Range=rng)["Body"]
    if s in ("http", "https"):
        headers = {"Range": rng} if start or end else {}
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=policy.read_timeout)
        if start and resp.status == 200:  # the server ignored Range: skip to the byte
            _skip(resp, start)
        return resp
    f = open(local_path(url), "rb")
    f.seek(start)
    return f


def _skip(f, n: int) -> None:
    while n > 0:
        got = f.read(min(n, 1 << 20))
        if not got:
            raise _Transient("body ended while skipping to the range start")
        n -= len(got)


# ---------------------------------------------------------------- reading


class Stats:
    """Per-process counters (bytes, requests, retries), for benchmarks and tests."""

    bytes = 0
    requests = 0
    retries = 0

    @classmethod
    def reset(cls) -> None:
        cls.bytes = cls.requests = cls.retries = 0


class RangeReader(io.RawIOBase):
    """Bytes ``[start, end)`` of ``url``; transient failures are retried and the read
    resumes from the byte reached (see the module docstring)."""

    def __init__(self, url: str, start: int = 0, end: int | None = None, policy: Policy = Policy(), file=None):
        self.url, self.pos, self.end, self.policy = url, start, end, policy
        self.body = file  # an open local file (a cached shard), else opened on the first read
        self.local = file is not None or not scheme(url)
        if file is not None:
            file.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = len(b) if self.end is None else min(len(b), self.end - self.pos)
        if want <= 0:
            return 0
        failures = 0
        while True:
            try:
                if self.body is None:
                    Stats.requests += 1
                    self.body = _open_raw(self.url, self.pos, self.end, self.policy)
                data = self.body.read(want)
                if not data and self.end is not None and not self.local:
                    raise _Transient(f"body ended at byte {self.pos}, {self.end - self.pos} short")
                b[: len(data)] = data
                self.pos += len(data)
                Stats.bytes += len(data)
                return len(data)
            except Exception as exc:  # noqa: BLE001 - classified: retried, or raised as one line
                if self.local:
                    raise
                err = _classify(exc, self.url)
                self._drop()
                if not isinstance(err, _Transient):
                    raise err from None
                failures += 1
                if failures >= self.policy.attempts:
                    raise ReadFailed(
                        f"{self.url}: gave up at byte {self.pos} after {failures} attempts: {err}"
                    ) from None
                Stats.retries += 1
                delay = self.policy.delay(failures - 1)
                log.info(
                    "%s: %s; retry %d/%d from byte %d in %.1fs",
                    self.url,
                    err,
                    failures,
                    self.policy.attempts - 1,
                    self.pos,
                    delay,
                )
                time.sleep(delay)

    def _drop(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
            self.body = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_range(
    url: str, start: int = 0, end: int | None = None, policy: Policy = Policy(), buffer: int = 1 << 20, file=None
):
    """A buffered, retrying reader of bytes ``[start, end)`` (of ``file`` if given)."""
    return io.BufferedReader(RangeReader(url, start, end, policy, file), buffer_size=buffer)


def read_bytes(url: str, policy: Policy = Policy()) -> bytes:
    """A whole object (a manifest): the size first, so a short body is caught and retried."""
    s = scheme(url)
    if not s:
        with open(local_path(url), "rb") as f:
            return f.read()
    if s != "s3":  # one GET: http.client raises IncompleteRead on a body shorter than its Content-Length

        def get():
            Stats.requests += 1
            with urllib.request.urlopen(url, timeout=policy.read_timeout) as resp:
                return resp.read()

        return _retrying("reach", url, get, policy)
    size = stat_size(url, policy)
    if size is None:
        raise NotFound(f"{url} not found")
    with open_range(url, 0, size, policy) as f:
        return f.read()


def _retrying(what: str, url: str, fn: Callable, policy: Policy):
    for k in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            err = _classify(exc, url)
            if not isinstance(err, _Transient):
                raise err from None
            if k == policy.attempts - 1:
                raise StoreError(f"cannot {what} {url} after {policy.attempts} attempts: {err}") from None
            Stats.retries += 1
            delay = policy.delay(k)
            log.info("%s: %s; retry %d/%d in %.1fs", url, err, k + 1, policy.attempts - 1, delay)
            time.sleep(delay)


def stat_size(url: str, policy: Policy = Policy()) -> int | None:
    """The object's size in bytes, or None if it does not exist."""
    found = stat(url, policy)
    return None if found is None else found[0]


def stat(url: str, policy: Policy = Policy()) -> tuple[int, str] | None:
    """The object's (size in bytes, ETag; for a local file its mtime in ns), or None if it
    does not exist: what identifies a version of it."""
    s = scheme(url)
    if not s:
        try:
            st = os.stat(local_path(url))
            return st.st_size, str(st.st_mtime_ns)
        except FileNotFoundError:
            return None

    def head():
        try:
            Stats.requests += 1
            if s == "s3":
                bucket, key = _split_s3(url)
                got = _s3(policy).head_object(Bucket=bucket, Key=key)
                return int(got["ContentLength"]), str(got.get("ETag", ""))
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=policy.read_timeout) as resp:
                return int(resp.headers["Content-Length"]), str(resp.headers.get("ETag", ""))
        except Exception as exc:  # noqa: BLE001
            if isinstance(_classify(exc, url), NotFound):
                if s == "s3":  # a missing key, or a missing bucket (HEAD cannot tell): ask the bucket
                    _check_bucket(url, policy)
                return None
            raise

    return _retrying("reach", url, head, policy)


def _check_bucket(url: str, policy: Policy) -> None:
    bucket, _ = _split_s3(url)
    try:
        _s3(policy).head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001
        if isinstance(_classify(exc, url), NotFound):
            raise StoreError(f"bucket {bucket} does not exist ({url})") from None
        raise


# ---------------------------------------------------------------- writing (S3)


def _writable(url: str) -> tuple[str, str]:
    """(bucket, key) of an object we may write."""
    if scheme(url) != "s3":
        raise StoreError(f"cannot write to {url}: only local paths and s3:// are writable")
    return _split_s3(url)


def put_file(path: str, url: str, policy: Policy = Policy()) -> None:
    """Upload a local file as one object: S3 makes it visible only once complete
    (multipart above 64 MiB, each part retried by boto3's transfer manager)."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = _writable(url)
    config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)
    _retrying("upload to", url, lambda: _s3(policy).upload_file(path, bucket, key, Config=config), policy)


def put_bytes(data: bytes, url: str, policy: Policy = Policy()) -> None:
    bucket, key = _writable(url)
    _retrying("upload to", url, lambda: _s3(policy).put_object(Bucket=bucket, Key=key, Body=data), policy)


def list_names(url: str, policy: Policy = Policy()) -> list[str]:
    """Object names directly under the prefix ``url`` (S3)."""
    bucket, key = _split_s3(url)
    prefix = key.rstrip("/") + "/" if key else ""

    def listing():
        out = []
        for page in _s3(policy).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            out.extend(o["Key"][len(prefix) :] for o in page.get("Contents", []))
        return out

    return _retrying("list", url, listing, policy)


def delete(url: str, policy: Policy = Policy()) -> None:
    bucket, key = _split_s3(url)
    _retrying("delete", url, lambda: _s3(policy).delete_object(Bucket=bucket, Key=key), policy)


# ---------------------------------------------------------------- cache


def download(url: str, path: str, size: int, policy: Policy = Policy()) -> str:
    """Copy bytes ``[0, size)`` of ``url`` to the local file ``path`` (retried and resumed
    as any read); their sha256, computed on the way."""
    h = hashlib.sha256()
    with open_range(url, 0, size, policy) as src, open(path, "wb") as dst:
        while chunk := src.read(1 << 22):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@contextmanager
def _locked(path: str):
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class ShardCache:
    """Whole shards on local disk under ``root``, at most ``limit`` bytes (0: no limit).

    A shard is downloaded to a temporary file, checked against the manifest's sha256 and
    renamed into place, under a per-shard lock file, so the ranks and workers of a node
    download it once. What was checked is stamped beside it (``<file>.ok``: inode, size,
    mtime, sha256); a file whose stamp no longer matches (it was written to, replaced,
    truncated) is hashed again, and a corrupted one is removed and fetched again. (Bit
    rot that leaves the mtime alone is not caught here; ``shard.py --verify`` re-hashes
    the store's copy. Without the stamp every worker would hash each shard it opens:
    at 1.1 GB/s, ~0.1 s of CPU per ImageNet shard per worker start.)
    Use is recorded in the file's atime (set explicitly, whatever the mount's atime
    policy); eviction removes the least recently used files until the cache fits."""

    root: str
    limit: int = 0

    def path(self, url: str, sha256: str) -> str:
        return os.path.join(self.root, f"{sha256[:16]}-{os.path.basename(url)}")

    def open(self, url: str, size: int, sha256: str, policy: Policy):
        """The verified shard, open for reading (fetched first if needed; once open,
        another process's eviction cannot take it away); None when it cannot fit in the
        cache (then it is streamed)."""
        for _ in range(3):  # evicted between the check and the open: fetch it again
            path = self.get(url, size, sha256, policy)
            if path is None:
                return None
            with contextlib.suppress(FileNotFoundError):
                return open(path, "rb")
        return None

    def get(self, url: str, size: int, sha256: str, policy: Policy) -> str | None:
        """The local path of the verified shard, fetching it if needed; None when it
        cannot fit in the cache."""
        if self.limit and size > self.limit:
            return None
        os.makedirs(self.root, exist_ok=True)
        path = self.path(url, sha256)
        with contextlib.suppress(FileNotFoundError):
            if self._valid(path, size, sha256):
                return self._used(path)
        with _locked(path + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                if self._valid(path, size, sha256):  # another rank fetched it while we waited
                    return self._used(path)
            for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # a download killed with its process
                os.remove(stale)
            for _ in range(policy.attempts):
                try:
                    with replacing(path, durable=False) as tmp:
                        if download(url, tmp, size, policy) != sha256:
                            raise _Mismatch
                except _Mismatch:
                    log.warning("%s: downloaded bytes do not match the manifest's sha256; fetching again", url)
                    continue
                _stamp_ok(path, sha256)
                break
            else:
                raise ReadFailed(f"{url}: sha256 differs from the manifest after {policy.attempts} downloads")
        self._evict(keep=path)
        return self._used(path)

    @staticmethod
    def _used(path: str) -> str:
        st = os.stat(path)
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))  # atime = last use; mtime kept (verification stamp)
        return path

    @staticmethod
    def _valid(path: str, size: int, sha256: str) -> bool:
        try:
            stamp = _stamp(path)
        except FileNotFoundError:
            return False
        if stamp[1] != size:
            os.remove(path)
            return False
        try:
            with open(path + ".ok") as f:
                if json.load(f) == [*stamp, sha256]:
                    return True
        except (OSError, ValueError):
            pass
        if sha256_file(path) != sha256:
            log.warning("cached shard %s is corrupt (sha256 differs from the manifest): removed, fetching again", path)
            os.remove(path)
            return False
        _stamp_ok(path, sha256)
        return True

    def _evict(self, keep: str) -> None:
        if not self.limit:
            return
        files = []
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            if name.endswith((".lock", ".ok", ".offsets")) or ".tmp-" in name:
                continue
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if os.path.isdir(p):  # manifests/: the node's copies of manifests (pipeline/manifest.py)
                continue
            files.append((st.st_atime_ns, st.st_size, p))
        total = sum(f[1] for f in files)
        for _, size, p in sorted(files):
            if total <= self.limit:
                break
            if p == keep:
                continue
            try:
                os.remove(p)  # a reader that has it open keeps reading (POSIX)
                total -= size
                for side in (".ok", ".offsets"):  # its stamp, its sample offsets (pipeline/manifest.py)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(p + side)
            except FileNotFoundError:
                pass


def _stamp(path: str) -> list:
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _stamp_ok(path: str, sha256: str) -> None:
    write_atomic(path + ".ok", json.dumps([*_stamp(path), sha256]), durable=False)


@dataclasses.dataclass(frozen=True)
class Store:
    """How the loader reads shards: the retry policy and an optional cache."""

    policy: Policy = Policy()
    cache: ShardCache | None = None

    def _cacheable(self, url: str, size: int | None, sha256: str | None) -> bool:
        """A cache, and a remote shard whose size and sha256 the manifest gives."""
        return self.cache is not None and scheme(url) in REMOTE and size is not None and bool(sha256)

    def cached_path(self, url: str, size: int | None, sha256: str | None) -> str | None:
        """Where the cache keeps the shard (whether there yet or not); None without a cache.
        Small files about the shard live beside it (``<path>.offsets``) and go with it."""
        return self.cache.path(url, sha256) if self._cacheable(url, size, sha256) else None

    def prefetch(self, url: str, size: int | None, sha256: str | None) -> threading.Thread | None:
        """With a cache: fetch a shard into it in a background thread (the next one,
        while the current one is decoded); a reader of that shard waits on its lock.
        Errors are left to that reader, which retries and reports them."""
        if not self._cacheable(url, size, sha256):
            return None

        def fetch():
            with contextlib.suppress(Exception):
                self.cache.get(url, size, sha256, self.policy)

        thread = threading.Thread(target=fetch, name="shard-prefetch", daemon=True)
        thread.start()
        return thread

    def open(self, url: str, start: int, end: int | None, size: int | None = None, sha256: str | None = None):
        """Bytes ``[start, end)`` of a shard: from the cache when there is one (fetching
        the whole shard into it first), else a ranged read."""
        if self._cacheable(url, size, sha256):
            f = self.cache.open(url, size, sha256, self.policy)
            if f is not None:
                return open_range(url, start, end, self.policy, file=f)
        return open_range(url, start, end, self.policy)
