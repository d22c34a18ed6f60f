"""The chunk store: committed chunk outputs under OUT/chunks/<content key>/, on any fsspec URL.

Layout (a user contract):

    OUT/chunks/<key>/<attempt>/frames.mkv          frames, FFV1 (lossless) in Matroska, RGB
                                                   (gbrp where FFmpeg's FFV1 has it, else bgr0)
    OUT/chunks/<key>/<attempt>/latents.safetensors final latents, when the backend returns them
    OUT/chunks/<key>/<attempt>/chunk.json          sidecar: seed, timings, worker, versions
    OUT/chunks/<key>/COMMIT.json                   written last, in one PUT: attempt id,
                                                   sha256 and size of every file, frame count
    OUT/identities/<key>.safetensors               identity bundles

Object stores have no atomic rename, so each attempt writes under its own unique folder
(``uuid4().hex``) and the chunk is committed by one small PUT of COMMIT.json (on a local
disk: a temporary file and ``os.replace``). A reader trusts only what COMMIT.json names and
checks sizes and sha256; a chunk without a valid commit is absent. Two writers racing on one
key both write complete attempts; the last commit wins and both are valid. Nothing here ever
deletes committed data.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from reelfarm.errors import StoreError

if TYPE_CHECKING:
    import torch

    from reelfarm.render.base import ChunkOutput

logger = logging.getLogger(__name__)

__all__ = ["ChunkRecord", "ChunkStore", "decode_frames", "encode_frames"]

COMMIT_VERSION = 1
COMMIT_NAME = "COMMIT.json"
FRAMES_NAME = "frames.mkv"
LATENTS_NAME = "latents.safetensors"
SIDECAR_NAME = "chunk.json"
# The only file names a commit may list, so a tampered commit cannot point outside its attempt.
_ATTEMPT_FILES = (FRAMES_NAME, LATENTS_NAME, SIDECAR_NAME)

_KEY_RE = re.compile(r"[0-9a-f]{16,64}")
_ATTEMPT_RE = re.compile(r"[0-9a-f]{32}")
# The frame rate written into the container. The store keeps frames, not timing: the plan
# owns the film's frame rate, and stitching sets it again.
_CONTAINER_RATE = 24


# ---------------------------------------------------------------------------------------
# Frames codec: FFV1 in Matroska, in memory, bit-exact RGB
# ---------------------------------------------------------------------------------------


@functools.cache
def _ffv1_pix_fmt() -> str:
    """``gbrp`` where this FFmpeg's FFV1 encoder takes 8-bit planar RGB, else ``bgr0``."""
    import av

    formats = {f.name for f in (av.codec.Codec("ffv1", "w").video_formats or ())}
    return "gbrp" if "gbrp" in formats else "bgr0"


def encode_frames(frames: np.ndarray, *, rate: int = _CONTAINER_RATE) -> bytes:
    """Encode ``T x H x W x 3`` uint8 RGB frames losslessly (FFV1 in Matroska).

    Args:
        frames: the frames, uint8 RGB.
        rate: frame rate written into the container.

    Returns:
        The Matroska file as bytes.
    """
    import av

    _check_frames(frames)
    num_frames, height, width, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = _ffv1_pix_fmt()
        # Version 3 codes slices independently (so both cores work) and CRCs each slice.
        stream.codec_context.options = {"level": "3", "slicecrc": "1"}
        stream.codec_context.thread_type = "SLICE"
        for i in range(num_frames):
            # The encoder converts rgb24 to its planar/padded RGB format: a pure reshuffle.
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def decode_frames(data: bytes, *, num_frames: int | None = None) -> np.ndarray:
    """Decode what :func:`encode_frames` wrote back to ``T x H x W x 3`` uint8 RGB.

    Args:
        data: the Matroska file.
        num_frames: the expected frame count, when known: frames are then decoded straight
            into one array (no second copy), and any other count is an error.

    Raises:
        ValueError: no frames, or not ``num_frames`` of them; ``av`` errors for a bad file.
    """
    import av

    out: np.ndarray | None = None
    pending: list[np.ndarray] = []
    count = 0
    with av.open(io.BytesIO(data), mode="r", format="matroska") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            rgb = _rgb_view(frame)
            if num_frames is None:
                pending.append(rgb)  # views keep their frames alive until the stack
            else:
                if count >= num_frames:
                    raise ValueError(f"more than the {num_frames} frames expected")
                if out is None:
                    out = np.empty((num_frames, *rgb.shape), np.uint8)
                out[count] = rgb
            count += 1
    if count == 0:
        raise ValueError("no video frames in the file")
    if num_frames is None:
        return np.stack(pending)
    if count != num_frames or out is None:
        raise ValueError(f"{count} frames, {num_frames} expected")
    return out


def _rgb_view(frame: Any) -> np.ndarray:
    """``H x W x 3`` RGB of a decoded frame; a view into it where the format allows."""
    if frame.format.name == "bgr0":
        # Fast path: view the packed B,G,R,pad plane and reorder in numpy.
        plane = frame.planes[0]
        packed = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
        return packed[:, : frame.width * 4].reshape(frame.height, frame.width, 4)[..., 2::-1]
    return frame.to_ndarray(format="rgb24")


def _check_frames(frames: Any) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(
            f"`frames` must be a uint8 numpy array, got {type(frames).__name__}"
            f"{'' if not isinstance(frames, np.ndarray) else ' of ' + str(frames.dtype)}"
        )
    if frames.ndim != 4 or frames.shape[3] != 3 or 0 in frames.shape:
        raise ValueError(f"`frames` must be T x H x W x 3 with T, H, W > 0, got {frames.shape}")


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"`key` must be 16 to 64 lowercase hex digits, got {key!r}")
    return key


def _check_relpath(relpath: Any) -> str:
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


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Fraction, PurePath, datetime)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkRecord:
    """What a worker returns to the driver about one committed chunk: small and picklable.

    Attributes:
        key: the chunk's content key.
        url: URL of the chunk folder, ``OUT/chunks/<key>``.
        attempt: the committed attempt id (folder name under ``url``).
        checksum: sha256 of the attempt's ``frames.mkv``.
        num_frames: frames in the chunk.
        width: frame width in pixels.
        height: frame height in pixels.
        bytes: total size of the attempt's committed files (frames, latents, sidecar).
        has_latents: whether ``latents.safetensors`` was written.
    """

    key: str
    url: str
    attempt: str
    checksum: str
    num_frames: int
    width: int
    height: int
    bytes: int
    has_latents: bool


class ChunkStore:
    """Chunk outputs and identity bundles under one root, on any fsspec URL or local path.

    The store pickles as its URL and storage options and re-creates its filesystem lazily,
    so Ray workers and other processes can use it as they receive it.

    Args:
        root_url: the run's output root ``OUT``: ``s3://bucket/run``, ``memory://run``, a path...
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
        return {
            "root_url": self.root_url,
            "storage_options": self.storage_options,
            "root": self.root,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root_url = state["root_url"]
        self.storage_options = state["storage_options"]
        self.root = state["root"]
        self._fs = None
        self._root_path = ""

    def __repr__(self) -> str:
        return f"ChunkStore({self.root!r})"

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
    def _local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    # --- URLs ------------------------------------------------------------------------------

    def url(self, *parts: str) -> str:
        """URL of ``parts`` joined under the root (a plain absolute path for local roots)."""
        return "/".join([self.root, *parts])

    def chunk_url(self, key: str) -> str:
        """URL of the chunk folder ``OUT/chunks/<key>``."""
        return self.url("chunks", _check_key(key))

    # --- small files -------------------------------------------------------------------------

    def write_bytes_atomic(self, relpath: str, data: bytes) -> str:
        """Write a small file so readers see the old content or the new, never a part.

        One PUT on object stores; a temporary file, fsync and ``os.replace`` on a local disk.

        Returns:
            The file's URL.
        """
        _check_relpath(relpath)
        self._put_atomic(self._path(relpath), bytes(data))
        return self.url(relpath)

    def read_bytes(self, relpath: str) -> bytes | None:
        """The content of ``relpath`` under the root, or None when it does not exist."""
        _check_relpath(relpath)
        try:
            return self.fs.cat_file(self._path(relpath))
        except FileNotFoundError:
            return None

    def _put_atomic(self, path: str, data: bytes) -> None:
        if not self._local:
            self.fs.pipe_file(path, data)
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _put(self, path: str, data: bytes) -> None:
        """Write a file inside an attempt folder: nobody reads it before the commit."""
        if self._local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    # --- identities --------------------------------------------------------------------------

    def put_identity(self, key: str, data: bytes) -> str:
        """Store identity bundle bytes (``IdentityBundle.to_bytes()``); returns the URL."""
        return self.write_bytes_atomic(f"identities/{_check_key(key)}.safetensors", data)

    def get_identity(self, key: str) -> bytes | None:
        """The identity bundle's bytes, or None when it was never stored."""
        return self.read_bytes(f"identities/{_check_key(key)}.safetensors")

    def has_identity(self, key: str) -> bool:
        """Whether an identity bundle is stored under ``key``."""
        path = self._path("identities", f"{_check_key(key)}.safetensors")
        self.fs.invalidate_cache(self._path("identities"))
        return bool(self.fs.exists(path))

    # --- commits -----------------------------------------------------------------------------

    def _load_commit(self, key: str) -> dict[str, Any] | None:
        """COMMIT.json of ``key``: None when absent, StoreError when present but invalid."""
        # cat_file is one GET: it never consults a (possibly stale) listing cache.
        try:
            raw = self.fs.cat_file(self._path("chunks", key, COMMIT_NAME))
        except FileNotFoundError:
            return None
        try:
            commit = json.loads(raw)
            files = commit["files"]
            valid = (
                commit.get("schema_version") == COMMIT_VERSION
                and commit.get("key") == key
                and isinstance(commit.get("attempt"), str)
                and _ATTEMPT_RE.fullmatch(commit["attempt"]) is not None
                and isinstance(files, dict)
                and FRAMES_NAME in files
                and SIDECAR_NAME in files
                and set(files) <= set(_ATTEMPT_FILES)
                and all(
                    isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
                    for f in files.values()
                )
                and all(isinstance(commit.get(k), int) for k in ("num_frames", "width", "height"))
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            raise StoreError(f"chunk `{key}` has an invalid {COMMIT_NAME} at {self.chunk_url(key)}")
        return commit

    def _require_commit(self, key: str) -> dict[str, Any]:
        commit = self._load_commit(_check_key(key))
        if commit is None:
            raise StoreError(f"chunk `{key}` is missing: no {COMMIT_NAME} at {self.chunk_url(key)}")
        return commit

    def _record(self, key: str, commit: dict[str, Any]) -> ChunkRecord:
        files = commit["files"]
        return ChunkRecord(
            key=key,
            url=self.chunk_url(key),
            attempt=commit["attempt"],
            checksum=files[FRAMES_NAME]["sha256"],
            num_frames=commit["num_frames"],
            width=commit["width"],
            height=commit["height"],
            bytes=sum(f["size"] for f in files.values()),
            has_latents=LATENTS_NAME in files,
        )

    def record(self, key: str) -> ChunkRecord | None:
        """The committed chunk's record from COMMIT.json, or None when not (validly) committed.

        Does not look at the files; see :meth:`is_complete`.
        """
        try:
            commit = self._load_commit(_check_key(key))
        except StoreError as err:
            logger.warning("%s; treating it as not committed", err)
            return None
        return None if commit is None else self._record(key, commit)

    def _read_file(self, key: str, commit: dict[str, Any], name: str) -> bytes:
        """Read one committed file, checking its size and sha256."""
        spec = commit["files"][name]
        path = self._path("chunks", key, commit["attempt"], name)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise StoreError(
                f"chunk `{key}` is partial: `{name}` of attempt {commit['attempt']} is missing"
            ) from None
        if len(data) != spec["size"]:
            raise StoreError(
                f"chunk `{key}` is partial: `{name}` of attempt {commit['attempt']} has "
                f"{len(data)} bytes, the commit says {spec['size']}"
            )
        if _sha256(data) != spec["sha256"]:
            raise StoreError(
                f"chunk `{key}` fails its checksum: `{name}` of attempt {commit['attempt']} "
                f"has sha256 {_sha256(data)}, the commit says {spec['sha256']} (checksum mismatch)"
            )
        return data

    def _check(self, key: str, *, verify: bool) -> dict[str, Any]:
        """The valid commit of ``key`` whose files are present with the right sizes (and hashes)."""
        commit = self._require_commit(key)
        attempt_dir = self._path("chunks", key, commit["attempt"])
        # Another process may have written the attempt after we listed its parent.
        self.fs.invalidate_cache(attempt_dir)
        for name, spec in commit["files"].items():
            if verify:
                self._read_file(key, commit, name)
                continue
            try:
                size = self.fs.info(f"{attempt_dir}/{name}")["size"]
            except FileNotFoundError:
                size = None
            if size != spec["size"]:
                raise StoreError(
                    f"chunk `{key}` is partial: `{name}` of attempt {commit['attempt']} "
                    f"{'is missing' if size is None else f'has {size} bytes'}, "
                    f"the commit says {spec['size']}"
                )
        return commit

    def is_complete(self, key: str, *, verify: bool = False) -> bool:
        """Whether ``key`` has a valid commit whose files exist with the committed sizes.

        Args:
            key: the chunk's content key.
            verify: also read every file and check its sha256.

        Errors other than "absent, partial or corrupt" (a lost connection...) propagate.
        """
        _check_key(key)
        try:
            self._check(key, verify=verify)
        except StoreError as err:
            logger.debug("%s", err)
            return False
        return True

    # --- chunks ------------------------------------------------------------------------------

    def write_chunk(self, key: str, output: ChunkOutput, *, meta: dict[str, Any]) -> ChunkRecord:
        """Write one rendered chunk as a new attempt and commit it.

        Args:
            key: the chunk's content key.
            output: frames (``T x H x W x 3`` uint8 RGB), optional latents and meta.
            meta: sidecar fields (seed, timings, worker, versions); merged over ``output.meta``.

        Returns:
            The record of the committed chunk.
        """
        # 1. Check inputs and encode everything in memory.
        _check_key(key)
        _check_frames(output.frames)
        num_frames, height, width, _ = output.frames.shape
        sidecar = {**(output.meta or {}), **(meta or {})}
        try:
            sidecar_bytes = json.dumps(sidecar, indent=2, sort_keys=True, default=_json_default)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`meta` of chunk `{key}` is not JSON serialisable: {err}") from None
        blobs = {FRAMES_NAME: encode_frames(output.frames), SIDECAR_NAME: sidecar_bytes.encode()}
        if output.latents is not None:
            blobs[LATENTS_NAME] = _latents_to_bytes(output.latents, key=key)

        # 2. Write the attempt under its own folder; nobody trusts it before the commit.
        attempt = uuid.uuid4().hex
        attempt_dir = self._path("chunks", key, attempt)
        try:
            for name, data in blobs.items():
                self._put(f"{attempt_dir}/{name}", data)
            self.fs.invalidate_cache(attempt_dir)
            for name, data in blobs.items():  # a HEAD each: catches a short upload
                size = self.fs.info(f"{attempt_dir}/{name}")["size"]
                if size != len(data):
                    raise StoreError(
                        f"chunk `{key}`: `{name}` of attempt {attempt} has {size} bytes "
                        f"after writing {len(data)}"
                    )
        except BaseException:
            # Uncommitted and unique to us: safe to remove. Never after the commit starts.
            try:
                self.fs.rm(attempt_dir, recursive=True)
            except Exception:  # best effort; an orphan attempt is harmless
                logger.warning("could not remove failed attempt %s of chunk %s", attempt, key)
            raise

        # 3. Commit with one small PUT. The last commit wins; earlier attempts stay valid.
        commit = {
            "schema_version": COMMIT_VERSION,
            "key": key,
            "attempt": attempt,
            "files": {name: {"size": len(d), "sha256": _sha256(d)} for name, d in blobs.items()},
            "num_frames": num_frames,
            "width": width,
            "height": height,
            "codec": "ffv1",
            "container": "matroska",
            "pix_fmt": _ffv1_pix_fmt(),
            "committed_at": datetime.now(UTC).isoformat(),
        }
        self._put_atomic(
            self._path("chunks", key, COMMIT_NAME),
            json.dumps(commit, indent=2, sort_keys=True).encode(),
        )
        logger.debug("committed chunk %s attempt %s", key, attempt)
        return self._record(key, commit)

    def read_frames(self, key: str) -> np.ndarray:
        """The committed frames of ``key``, ``T x H x W x 3`` uint8 RGB, checksum verified.

        Raises:
            StoreError: the chunk is missing, partial, fails its checksum or is undecodable.
        """
        commit = self._require_commit(key)
        data = self._read_file(key, commit, FRAMES_NAME)
        try:
            frames = decode_frames(data, num_frames=commit["num_frames"])
        except Exception as err:
            raise StoreError(f"chunk `{key}` is undecodable: {type(err).__name__}: {err}") from None
        expected = (commit["num_frames"], commit["height"], commit["width"], 3)
        if frames.shape != expected:
            raise StoreError(
                f"chunk `{key}` is undecodable: decoded {frames.shape}, the commit says {expected}"
            )
        return frames

    def read_latents(self, key: str) -> torch.Tensor | None:
        """The committed final latents of ``key`` (CPU tensor), or None when it has none."""
        commit = self._require_commit(key)
        if LATENTS_NAME not in commit["files"]:
            return None
        data = self._read_file(key, commit, LATENTS_NAME)
        from safetensors.torch import load

        try:
            return load(data)["latents"]
        except Exception as err:
            raise StoreError(
                f"chunk `{key}` has undecodable latents: {type(err).__name__}: {err}"
            ) from None

    def read_sidecar(self, key: str) -> dict[str, Any]:
        """The committed sidecar (``chunk.json``) of ``key``: the meta given at write time."""
        commit = self._require_commit(key)
        data = self._read_file(key, commit, SIDECAR_NAME)
        try:
            return json.loads(data)
        except ValueError as err:
            raise StoreError(f"chunk `{key}` has an undecodable sidecar: {err}") from None


def _latents_to_bytes(latents: Any, *, key: str) -> bytes:
    import torch
    from safetensors.torch import save

    try:
        tensor = torch.as_tensor(latents).detach().to("cpu").contiguous()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`latents` of chunk `{key}` is not a tensor: {err}") from None
    return save({"latents": tensor}, metadata={"key": key})
