"""A storage location: one root on any fsspec URL, with all-or-nothing writes.

Every file reelfarm writes under OUT goes through :class:`Location`: run documents,
manifests, committed chunks and deliverables. A reader sees the old file or the new one,
never a part: object stores get one PUT (an object appears only when its upload
completes), a local disk gets a temporary file in the same folder, fsync and ``os.replace``.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["Location", "check_relpath"]

logger = logging.getLogger(__name__)


def check_relpath(relpath: Any) -> str:
    """A relative path under the root: no scheme, no ``..``, no absolute or odd paths."""
    bad = (
        not isinstance(relpath, str)
        or not relpath
        or relpath.startswith("/")
        or "\\" in relpath
        or "\x00" in relpath
        or "://" in relpath
        or "::" in relpath
        or any(part in ("", ".", "..") for part in relpath.split("/"))
    )
    if bad:
        raise ValueError(f"`relpath` must be a plain relative path under the root, got {relpath!r}")
    return relpath


class Location:
    """A root folder on any fsspec URL or local path.

    Pickles as its URL and storage options and re-creates its filesystem lazily, so Ray
    workers and other processes can use it as they receive it.

    Args:
        root_url: ``s3://bucket/run``, ``memory://run``, a path...
        storage_options: passed to the fsspec filesystem (credentials, endpoint...).
    """

    def __init__(self, root_url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(root_url, str) or not root_url:
            raise ValueError(f"`root_url` must be a non-empty string, got {root_url!r}")
        self.root_url = root_url
        self.storage_options = dict(storage_options or {})
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root_path = ""
        fs = self.fs  # fail early on an unknown protocol or bad options
        if isinstance(fs, LocalFileSystem):
            # An absolute path: workers and other processes may run in another folder.
            self.root_url = self.root = self._root_path
        else:
            self.root = root_url.rstrip("/")  # kept as given, so chained URLs survive

    # --- pickling: URL and options only; the filesystem is rebuilt on first use ---------
    def __getstate__(self) -> dict[str, Any]:
        return {"root_url": self.root_url, "storage_options": self.storage_options, "root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root_url = state["root_url"]
        self.storage_options = state["storage_options"]
        self.root = state["root"]
        self._fs = None
        self._root_path = ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem, created on first use in each process."""
        if self._fs is None:
            fs, path = fsspec.core.url_to_fs(self.root_url, **self.storage_options)
            self._fs, self._root_path = fs, path.rstrip("/")
        return self._fs

    def _path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of ``parts`` under the root."""
        if self._fs is None:
            self.fs  # noqa: B018 - builds the filesystem and _root_path
        return "/".join([self._root_path, *parts])

    @property
    def local(self) -> bool:
        """Whether the root is a folder on this machine's disk."""
        return isinstance(self.fs, LocalFileSystem)

    def url(self, *parts: str) -> str:
        """URL of ``parts`` joined under the root (a plain absolute path for local roots)."""
        return "/".join([self.root, *parts])

    def child(self, relpath: str) -> Location:
        """The location ``relpath`` under this one, with the same storage options."""
        return Location(self.url(check_relpath(relpath)), storage_options=self.storage_options)

    # --- small files ------------------------------------------------------------------
    def write_bytes_atomic(self, relpath: str, data: bytes) -> str:
        """Write a file so readers see the old content or the new, never a part.

        Returns:
            The file's URL.
        """
        check_relpath(relpath)
        self._put_atomic(self._path(relpath), bytes(data))
        return self.url(relpath)

    def read_bytes(self, relpath: str) -> bytes | None:
        """The content of ``relpath`` under the root, or None when it does not exist."""
        check_relpath(relpath)
        try:
            return self.fs.cat_file(self._path(relpath))
        except FileNotFoundError:
            return None

    def put_file_atomic(self, local_path: str, relpath: str) -> str:
        """Publish a local file as ``relpath`` in one step (large files: deliverables).

        Local roots: copied under a temporary name beside the target, then renamed. Object
        stores: one upload, which becomes visible only when complete.

        Returns:
            The file's URL.
        """
        check_relpath(relpath)
        path = self._path(relpath)
        if not self.local:
            parent = path.rsplit("/", 1)[0]
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            self.fs.put_file(local_path, path)
            return self.url(relpath)
        with open(local_path, "rb") as src:
            self._put_atomic(path, src)
        return self.url(relpath)

    def _put_atomic(self, path: str, data: Any) -> None:
        """``data``: bytes, or a binary file object to copy from."""
        if not self.local:
            self.fs.pipe_file(path, data if isinstance(data, bytes) else data.read())
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _put(self, path: str, data: bytes) -> None:
        """Write a file nobody reads before a later commit names it (no atomicity needed)."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)
