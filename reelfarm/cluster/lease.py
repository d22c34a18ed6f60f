"""One writer per chunk: leases beside the chunks, so two runs into one OUT never render a
chunk twice.

Before a run sends a chunk to a worker it takes the chunk's lease,
``OUT/chunks/<key>/LEASE.json`` (holder, expiry). A lease another live run holds is
respected: the chunk waits (the other run commits it, or lets its lease lapse). A run
renews the leases of the chunks it has in flight every third of the lease's life, so a
lease whose holder stopped heartbeating (a killed driver) lapses and is taken over. The
take is a compare-and-swap on the store:

- a local disk: the read-check-write happens under ``flock`` on ``chunks/<key>/.lease.lock``;
- S3 (and S3-compatible stores): conditional writes, ``If-None-Match: *`` to create and
  ``If-Match: <etag>`` to take over or renew, so of two racing writers exactly one wins;
- any other fsspec store: read, check, write (best effort; say so to operators).

Leases use the wall clock (expiry in Unix seconds): hosts sharing an OUT need clocks within
a small fraction of the lease's life (NTP does that).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from reelfarm.cluster.store import ChunkStore

__all__ = ["LEASE_NAME", "Lease", "Leases"]

logger = logging.getLogger(__name__)
LEASE_NAME = "LEASE.json"


@dataclass(frozen=True)
class Lease:
    """Who holds a chunk's lease, and until when (Unix seconds)."""

    holder: str
    expires: float
    tag: str | None = None  # the object's ETag on S3, for If-Match

    def live(self, now: float) -> bool:
        return self.expires > now


class Leases:
    """Take, renew and release chunk leases on a chunk store.

    Args:
        store: the chunk store (OUT).
        holder: this run's id; two runs never share one.
        ttl_s: a lease's life; renewed every ``ttl_s / 3`` while its chunk is in flight.
        clock: wall-clock seconds (tests pass their own).
    """

    def __init__(self, store: ChunkStore, holder: str, *, ttl_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.holder = holder
        self.ttl_s = ttl_s
        self.clock = clock
        self.taken_over = 0  # leases taken from holders that stopped heartbeating

    def _path(self, key: str) -> str:
        return self.store._path("chunks", key, LEASE_NAME)

    def _doc(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": self.clock() + self.ttl_s}).encode()

    def _parse(self, data: bytes, tag: str | None = None) -> Lease | None:
        try:
            doc = json.loads(data)
            return Lease(str(doc["holder"]), float(doc["expires"]), tag)
        except (ValueError, KeyError, TypeError):
            return Lease("?", 0.0, tag)  # unreadable: treated as lapsed

    @property
    def _s3(self) -> bool:
        return "s3" in (self.store.fs.protocol if isinstance(self.store.fs.protocol, tuple)
                        else (self.store.fs.protocol,))

    # --- reading ------------------------------------------------------------------------
    def holder_of(self, key: str) -> Lease | None:
        """The chunk's lease, or None when it has none."""
        path = self._path(key)
        try:
            data = self.store.fs.cat_file(path)
        except FileNotFoundError:
            return None
        tag = None
        if self._s3:
            try:
                tag = self.store.fs.info(path).get("ETag")
            except FileNotFoundError:
                return None
        return self._parse(data, tag)

    # --- taking -------------------------------------------------------------------------
    def acquire(self, key: str) -> bool:
        """Take (or renew) the lease of ``key``; False while another live run holds it."""
        if self.store.local:
            return self._acquire_local(key)
        if self._s3:
            return self._acquire_s3(key)
        return self._acquire_plain(key)

    def _decide(self, current: Lease | None) -> bool:
        if current is None or current.holder == self.holder:
            return True
        if current.live(self.clock()):
            return False
        logger.warning("lease held by %s lapsed %.0f s ago: taken over", current.holder,
                       self.clock() - current.expires)
        self.taken_over += 1
        return True

    def _acquire_local(self, key: str) -> bool:
        import fcntl

        folder = os.path.dirname(self._path(key))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".lease.lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not self._decide(self.holder_of(key)):
                    return False
                # Replaced whole (readers see the old lease or the new one), not fsynced: a
                # lease outlives no crash that matters (a crashed holder's lease lapses), and
                # an fsync per chunk sent was half of the driver's time per chunk on a local disk.
                path = self._path(key)
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    f.write(self._doc())
                os.replace(tmp, path)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _acquire_s3(self, key: str) -> bool:
        current = self.holder_of(key)
        if not self._decide(current):
            return False
        try:
            if current is None:
                self.store.fs.pipe_file(self._path(key), self._doc(), mode="create")  # If-None-Match: *
            else:
                self.store.fs.pipe_file(self._path(key), self._doc(), IfMatch=current.tag)
        except Exception as e:  # noqa: BLE001 - 412 Precondition Failed: another writer won
            if _precondition_failed(e):
                return False
            raise
        return True

    def _acquire_plain(self, key: str) -> bool:
        if not self._decide(self.holder_of(key)):
            return False
        self.store._put_atomic(self._path(key), self._doc())
        return True

    def renew(self, keys: Iterable[str]) -> list[str]:
        """Renew the leases of ``keys``; returns those lost to another run meanwhile."""
        return [k for k in keys if not self.acquire(k)]

    def release(self, key: str) -> None:
        """Give the lease up (after the chunk is committed); best effort."""
        current = self.holder_of(key)
        if current is None or current.holder != self.holder:
            return
        try:
            self.store.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - a stale lease only delays nobody: it is ours and lapses
            logger.debug("could not release the lease of %s: %s", key, e)


def _precondition_failed(error: BaseException) -> bool:
    """Whether a conditional write lost the race (S3 412): s3fs raises FileExistsError for
    If-None-Match, and an OSError caused by botocore's ClientError for If-Match."""
    if isinstance(error, FileExistsError):
        return True
    response: Any = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")
