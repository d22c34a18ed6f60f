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

import hashlib
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

import numpy as np

from reelfarm.errors import StoreError
from reelfarm.render.codec import check_frames, decode_frame, decode_frames, encode_frames, ffv1_pix_fmt
from reelfarm.storage import Location

if TYPE_CHECKING:
    import torch

    from reelfarm.render.base import ChunkOutput

logger = logging.getLogger(__name__)

__all__ = ["ChunkRecord", "ChunkStore"]

COMMIT_VERSION = 1
COMMIT_NAME = "COMMIT.json"
FRAMES_NAME = "frames.mkv"
LATENTS_NAME = "latents.safetensors"
SIDECAR_NAME = "chunk.json"
# The only file names a commit may list, so a tampered commit cannot point outside its attempt.
_ATTEMPT_FILES = (FRAMES_NAME, LATENTS_NAME, SIDECAR_NAME)

_KEY_RE = re.compile(r"[0-9a-f]{16,64}")
_ATTEMPT_RE = re.compile(r"[0-9a-f]{32}")


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"`key` must be 16 to 64 lowercase hex digits, got {key!r}")
    return key


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


class ChunkStore(Location):
    """Committed chunk outputs and identity bundles under one root (``OUT``).

    Commit, read and verify; nothing else. Run documents (film, status, manifest) belong
    to :class:`reelfarm.cluster.outdir.OutputFolder`; the frames codec to
    :mod:`reelfarm.render.codec`.

    Args:
        root_url: the run's output root ``OUT``: ``s3://bucket/run``, ``memory://run``, a path...
        storage_options: passed to the fsspec filesystem (credentials, endpoint...).
    """

    def chunk_url(self, key: str) -> str:
        """URL of the chunk folder ``OUT/chunks/<key>``."""
        return self.url("chunks", _check_key(key))

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
            raw = self._cat(self._path("chunks", key, COMMIT_NAME))
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
            raise StoreError(f"chunk `{key}` has an invalid {COMMIT_NAME} at {self.chunk_url(key)}", keys=(key,))
        return commit

    def _cat(self, path: str) -> bytes:
        """One whole file: on a local disk without fsspec's file layer (a resume scan reads
        one commit per chunk, 100,000 of them)."""
        if self.local:
            with open(path, "rb") as f:
                return f.read()
        return self.fs.cat_file(path)

    def _size(self, path: str) -> int | None:
        """A file's size, None when it is absent."""
        try:
            return os.stat(path).st_size if self.local else self.fs.info(path)["size"]
        except FileNotFoundError:
            return None

    def _require_commit(self, key: str) -> dict[str, Any]:
        commit = self._load_commit(_check_key(key))
        if commit is None:
            raise StoreError(f"chunk `{key}` is missing: no {COMMIT_NAME} at {self.chunk_url(key)}", keys=(key,))
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
            data = self._cat(path)
        except FileNotFoundError:
            raise StoreError(
                f"chunk `{key}` is partial: `{name}` of attempt {commit['attempt']} is missing", keys=(key,)) from None
        if len(data) != spec["size"]:
            raise StoreError(
                f"chunk `{key}` is partial: `{name}` of attempt {commit['attempt']} has "
                f"{len(data)} bytes, the commit says {spec['size']}", keys=(key,))
        if _sha256(data) != spec["sha256"]:
            raise StoreError(
                f"chunk `{key}` fails its checksum: `{name}` of attempt {commit['attempt']} "
                f"has sha256 {_sha256(data)}, the commit says {spec['sha256']} (checksum mismatch)", keys=(key,))
        return data

    def _check(self, key: str, *, verify: bool) -> dict[str, Any]:
        """The valid commit of ``key`` whose files are present with the right sizes (and hashes)."""
        commit = self._require_commit(key)
        attempt_dir = self._path("chunks", key, commit["attempt"])
        if not self.local:  # another process may have written the attempt after we listed its parent
            self.fs.invalidate_cache(attempt_dir)
        for name, spec in commit["files"].items():
            if verify:
                self._read_file(key, commit, name)
                continue
            size = self._size(f"{attempt_dir}/{name}")
            if size != spec["size"]:
                raise StoreError(
                    f"chunk `{key}` is partial: `{name}` of attempt {commit['attempt']} "
                    f"{'is missing' if size is None else f'has {size} bytes'}, "
                    f"the commit says {spec['size']}", keys=(key,))
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

    def committed(self, key: str, *, verify: bool = False) -> ChunkRecord | None:
        """The record of ``key`` when :meth:`is_complete` holds, else None (one read of its commit)."""
        _check_key(key)
        try:
            commit = self._check(key, verify=verify)
        except StoreError as err:
            logger.debug("%s", err)
            return None
        return self._record(key, commit)

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
        check_frames(output.frames)
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
                        f"after writing {len(data)}", keys=(key,))
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
            "pix_fmt": ffv1_pix_fmt(),
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
            raise StoreError(f"chunk `{key}` is undecodable: {type(err).__name__}: {err}", keys=(key,)) from None
        expected = (commit["num_frames"], commit["height"], commit["width"], 3)
        if frames.shape != expected:
            raise StoreError(
                f"chunk `{key}` is undecodable: decoded {frames.shape}, the commit says {expected}", keys=(key,))
        return frames

    def read_frame(self, key: str, index: int) -> np.ndarray:
        """Frame ``index`` of the committed chunk ``key``, ``H x W x 3``, checksum verified (the
        whole file), without decoding the frames before it.

        Raises:
            StoreError: as :meth:`read_frames`, or ``index`` is not one of its frames.
        """
        commit = self._require_commit(key)
        data = self._read_file(key, commit, FRAMES_NAME)
        try:
            frame = decode_frame(data, index, num_frames=commit["num_frames"])
        except Exception as err:
            raise StoreError(f"chunk `{key}`: frame {index} is undecodable: {type(err).__name__}: {err}",
                             keys=(key,)) from None
        if frame.shape != (commit["height"], commit["width"], 3):
            raise StoreError(f"chunk `{key}`: frame {index} decoded {frame.shape}, the commit says "
                             f"{(commit['height'], commit['width'], 3)}", keys=(key,))
        return frame

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
                f"chunk `{key}` has undecodable latents: {type(err).__name__}: {err}", keys=(key,)) from None

    def read_sidecar(self, key: str) -> dict[str, Any]:
        """The committed sidecar (``chunk.json``) of ``key``: the meta given at write time."""
        commit = self._require_commit(key)
        data = self._read_file(key, commit, SIDECAR_NAME)
        try:
            return json.loads(data)
        except ValueError as err:
            raise StoreError(f"chunk `{key}` has an undecodable sidecar: {err}", keys=(key,)) from None


def _latents_to_bytes(latents: Any, *, key: str) -> bytes:
    import torch
    from safetensors.torch import save

    try:
        tensor = torch.as_tensor(latents).detach().to("cpu").contiguous()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`latents` of chunk `{key}` is not a tensor: {err}") from None
    return save({"latents": tensor}, metadata={"key": key})
