"""Opening shards that live elsewhere: ``http(s)://`` through the standard library, and
``s3://``, ``gs://``, ``hf://`` (any other ``scheme://``) through fsspec when its client
library is installed.

A network store is slow, drops connections and sometimes disappears for a minute. The
stream returned by :func:`open_shard` hides the transient part of that: a read that fails
(connection reset, refused while the server restarts, a socket timeout, a body cut short of
its ``Content-Length``) reconnects and continues at the byte it had reached (an HTTP
``Range`` request, or a seek for fsspec files), after a backoff that doubles from
``backoff`` up to ``backoff_max`` seconds. A shard that makes no progress for ``deadline``
seconds, or that the server says does not exist (404, 410, 403), raises :class:`ShardGone`:
the reader counts it by URL and goes on with the next shard, so a run never hangs on one
store for longer than ``deadline`` plus one socket ``timeout``.
"""

from __future__ import annotations

import io
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

HTTP = ("http://", "https://")
FSSPEC = ("s3://", "gs://", "gcs://", "hf://", "az://", "abfs://")


class ShardGone(OSError):
    """A shard that cannot be read (missing, or no progress within the deadline)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


@dataclass(frozen=True)
class NetworkPolicy:
    """How hard to try: socket ``timeout`` per read, total ``deadline`` without progress,
    exponential ``backoff`` (seconds) between attempts, capped at ``backoff_max``."""

    timeout: float = 30.0
    deadline: float = 120.0
    backoff: float = 0.5
    backoff_max: float = 16.0

    @classmethod
    def from_env(cls) -> NetworkPolicy:
        """The defaults, or ``UNIPRED_SHARD_TIMEOUT`` / ``UNIPRED_SHARD_DEADLINE`` (seconds)
        from the environment (they reach every rank and worker of a launched job)."""
        env = os.environ
        return cls(
            timeout=float(env.get("UNIPRED_SHARD_TIMEOUT", cls.timeout)),
            deadline=float(env.get("UNIPRED_SHARD_DEADLINE", cls.deadline)),
        )


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through http or fsspec (any ``scheme://`` but ``file://``)."""
    return url.startswith(HTTP + FSSPEC) or ("://" in url and not url.startswith("file://"))


class RetryingStream(io.RawIOBase):
    """A read-only byte stream over ``url`` that survives transient failures (see module)."""

    def __init__(self, url: str, policy: NetworkPolicy = NetworkPolicy(), on_retry=None):
        super().__init__()
        self.url, self.policy, self.on_retry = url, policy, on_retry
        self.pos, self.size, self.retries = 0, None, 0
        self._resp, self._progress = None, time.monotonic()
        self._connect_with_retries()

    # -- connections ------------------------------------------------------------------------
    def _open_http(self):
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        req = urllib.request.Request(self.url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=self.policy.timeout)
        except urllib.error.HTTPError as e:
            if e.code in (403, 404, 410):  # the server answered: it is not there
                raise ShardGone(self.url, f"HTTP {e.code}") from None
            raise
        if self.size is None:
            length = resp.headers.get("Content-Length")
            self.size = int(length) + self.pos if length is not None else None
        if self.pos and resp.status != 206:  # the server ignored Range: drop what we had
            left = self.pos
            while left:
                chunk = resp.read(min(left, 1 << 20))
                if not chunk:
                    raise ConnectionError("server ignored Range and ended early")
                left -= len(chunk)
        return resp

    def _open_fsspec(self):
        try:
            import fsspec
        except ImportError:
            raise ShardGone(self.url, "fsspec is not installed (pip install fsspec)") from None
        try:
            f = fsspec.open(self.url, "rb").open()
        except ImportError as e:  # the protocol's client library (s3fs, gcsfs, ...)
            raise ShardGone(self.url, f"no client library for this protocol ({e})") from None
        except FileNotFoundError:
            raise ShardGone(self.url, "not found") from None
        if self.size is None:
            self.size = getattr(f, "size", None)
        if self.pos:
            f.seek(self.pos)
        return f

    def _connect_with_retries(self):
        start, wait = time.monotonic(), self.policy.backoff
        while True:
            try:
                self._resp = self._open_http() if self.url.startswith(HTTP) else self._open_fsspec()
                return
            except ShardGone:
                raise
            except (OSError, ConnectionError, urllib.error.URLError, TimeoutError) as e:
                last = e
            if time.monotonic() - start + wait > self.policy.deadline:
                raise ShardGone(self.url, f"no progress for {self.policy.deadline:.0f} s ({last})")
            self.retries += 1
            if self.on_retry is not None:
                self.on_retry(self.url, last)
            time.sleep(wait)
            wait = min(wait * 2, self.policy.backoff_max)

    def _drop(self):
        if self._resp is not None:
            try:
                self._resp.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass
        self._resp = None

    # -- io.RawIOBase ----------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            try:
                n = self._resp.readinto(buf) if hasattr(self._resp, "readinto") else None
                if n is None:
                    data = self._resp.read(len(buf))
                    n = len(data)
                    buf[:n] = data
            except (OSError, ConnectionError, TimeoutError) as e:
                # includes http.client.IncompleteRead's base (HTTPException is not OSError)
                err = e
            except Exception as e:  # noqa: BLE001 - http.client.IncompleteRead and friends
                if type(e).__module__ != "http.client":
                    raise
                err = e
            else:
                if n:
                    self.pos += n
                    self._progress = time.monotonic()
                    return n
                if self.size is None or self.pos >= self.size:
                    return 0  # the real end
                err = ConnectionError(f"connection closed at byte {self.pos} of {self.size}")
            self._drop()
            if time.monotonic() - self._progress > self.policy.deadline:
                # a server that accepts connections but never sends: give up all the same
                raise ShardGone(self.url, f"no progress for {self.policy.deadline:.0f} s ({err})")
            if self.on_retry is not None:
                self.on_retry(self.url, err)
            self.retries += 1
            self._connect_with_retries()

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str, policy: NetworkPolicy = NetworkPolicy(), on_retry=None):
    """A buffered binary stream of the shard at ``url`` (a local path, http(s), or fsspec)."""
    if not is_remote(url):
        return open(url.removeprefix("file://"), "rb")
    return io.BufferedReader(RetryingStream(url, policy, on_retry), buffer_size=1 << 16)


def read_small(url: str, policy: NetworkPolicy = NetworkPolicy(deadline=10.0)) -> bytes | None:
    """The whole (small) file at ``url`` (meta.json next to remote shards), or None if absent."""
    try:
        with open_shard(url, policy) as f:
            return f.read()
    except (ShardGone, FileNotFoundError):
        return None
