"""The chunk store on a local folder, memory:// and a real S3 API (moto server)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from reelfarm.cluster.store import ChunkRecord, ChunkStore
from reelfarm.errors import StoreError
from reelfarm.render.base import ChunkOutput
from reelfarm.render.identity import IdentityBundle

REPO = Path(__file__).resolve().parents[2]
KEY = "0123456789abcdef0123456789abcdef"
OTHER_KEY = "fedcba9876543210"


def _frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), np.uint8)


def _make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    if kind == "local":
        yield ChunkStore(str(tmp_path / "out"))
    elif kind == "memory":
        store = ChunkStore(f"memory://reelfarm-test-{uuid.uuid4().hex}")
        yield store
        if store.fs.exists(store.root):  # memory:// is process-global
            store.fs.rm(store.root, recursive=True)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield ChunkStore(f"{bucket['url']}/run", storage_options=bucket["storage_options"])


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    yield from _make_store(request.param, request, tmp_path)


@pytest.fixture(params=["local", "s3"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChunkStore]:
    """A store other processes can reach (memory:// is per process)."""
    yield from _make_store(request.param, request, tmp_path)


def _file_url(store: ChunkStore, record: ChunkRecord, name: str) -> str:
    return store.url("chunks", record.key, record.attempt, name)


@pytest.mark.parametrize("shape", [(3, 18, 32), (2, 72, 128), (2, 17, 33)])
def test_write_read_round_trip_is_bit_exact(store: ChunkStore, shape: tuple[int, int, int]) -> None:
    frames = _frames(*shape)
    record = store.write_chunk(KEY, ChunkOutput(frames, meta={"seed": 7}), meta={"worker": "w1"})

    assert record.key == KEY and record.url == store.chunk_url(KEY)
    assert (record.num_frames, record.height, record.width) == shape
    assert not record.has_latents and record.bytes > 0 and len(record.checksum) == 64
    assert store.record(KEY) == record
    assert store.is_complete(KEY) and store.is_complete(KEY, verify=True)
    np.testing.assert_array_equal(store.read_frames(KEY), frames)
    np.testing.assert_array_equal(store.read_frame(KEY, shape[0] - 1), frames[-1])
    assert store.read_sidecar(KEY) == {"seed": 7, "worker": "w1"}
    assert store.read_latents(KEY) is None


def test_layout_is_the_contract(store: ChunkStore) -> None:
    frames = _frames(2, 18, 32)
    record = store.write_chunk(KEY, ChunkOutput(frames, latents=torch.zeros(2)), meta={})
    listed = store.fs.ls(store.url("chunks", KEY, record.attempt), detail=False)
    names = {url.rsplit("/", 1)[-1] for url in listed}
    assert names == {"frames.mkv", "latents.safetensors", "chunk.json"}
    commit = json.loads(store.fs.cat_file(store.url("chunks", KEY, "COMMIT.json")))
    assert commit["attempt"] == record.attempt and len(record.attempt) == 32
    assert set(commit["files"]) == names
    assert commit["files"]["frames.mkv"]["sha256"] == record.checksum
    assert (commit["num_frames"], commit["width"], commit["height"]) == (2, 32, 18)
    assert commit["pix_fmt"] in ("gbrp", "bgr0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latents_round_trip(store: ChunkStore, dtype: torch.dtype) -> None:
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    record = store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32), latents=latents), meta={})
    assert record.has_latents
    back = store.read_latents(KEY)
    assert back is not None and back.dtype == dtype
    assert torch.equal(back, latents)


def test_files_without_a_commit_are_not_a_chunk(store: ChunkStore) -> None:
    assert not store.is_complete(KEY) and store.record(KEY) is None
    store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32)), meta={})
    store.fs.rm(store.url("chunks", KEY, "COMMIT.json"))  # a writer that died before its commit

    assert not store.is_complete(KEY) and not store.is_complete(KEY, verify=True)
    assert store.record(KEY) is None
    with pytest.raises(StoreError, match=f"chunk `{KEY}` is missing"):
        store.read_frames(KEY)


def test_invalid_commit_is_not_a_chunk(store: ChunkStore) -> None:
    store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32)), meta={})
    store.fs.pipe_file(store.url("chunks", KEY, "COMMIT.json"), b'{"attempt": "../../x"')
    assert not store.is_complete(KEY) and store.record(KEY) is None
    with pytest.raises(StoreError, match=f"chunk `{KEY}` has an invalid COMMIT.json"):
        store.read_frames(KEY)


def test_truncated_frames_are_caught(store: ChunkStore) -> None:
    record = store.write_chunk(KEY, ChunkOutput(_frames(3, 18, 32)), meta={})
    url = _file_url(store, record, "frames.mkv")
    store.fs.pipe_file(url, store.fs.cat_file(url)[: record.bytes // 3])

    assert not store.is_complete(KEY)
    assert not store.is_complete(KEY, verify=True)
    with pytest.raises(StoreError, match=f"chunk `{KEY}` is partial: `frames.mkv`"):
        store.read_frames(KEY)


def test_missing_file_is_caught(store: ChunkStore) -> None:
    record = store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32), latents=torch.ones(3)), meta={})
    store.fs.rm(_file_url(store, record, "latents.safetensors"))
    assert not store.is_complete(KEY)
    with pytest.raises(StoreError, match=f"chunk `{KEY}` is partial: .* is missing"):
        store.read_latents(KEY)


def test_bit_flip_fails_the_checksum(store: ChunkStore) -> None:
    record = store.write_chunk(KEY, ChunkOutput(_frames(3, 18, 32)), meta={})
    url = _file_url(store, record, "frames.mkv")
    data = bytearray(store.fs.cat_file(url))
    data[len(data) // 2] ^= 0x01
    store.fs.pipe_file(url, bytes(data))

    assert store.is_complete(KEY)  # sizes only: cheap enough for resume checks
    assert not store.is_complete(KEY, verify=True)
    with pytest.raises(StoreError, match=f"chunk `{KEY}` fails its checksum.*checksum mismatch"):
        store.read_frames(KEY)
    with pytest.raises(StoreError, match=f"chunk `{KEY}` fails its checksum"):  # one frame: whole file checked
        store.read_frame(KEY, 2)


def test_undecodable_frames_are_caught(store: ChunkStore) -> None:
    record = store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32)), meta={})
    commit_url = store.url("chunks", KEY, "COMMIT.json")
    commit = json.loads(store.fs.cat_file(commit_url))
    garbage = b"not a matroska file" * 10
    store.fs.pipe_file(_file_url(store, record, "frames.mkv"), garbage)
    sha256 = hashlib.sha256(garbage).hexdigest()
    commit["files"]["frames.mkv"] = {"size": len(garbage), "sha256": sha256}
    store.fs.pipe_file(commit_url, json.dumps(commit).encode())

    assert store.is_complete(KEY, verify=True)  # bytes are as committed...
    with pytest.raises(StoreError, match=f"chunk `{KEY}` is undecodable"):
        store.read_frames(KEY)  # ...but they are not frames


def test_failed_write_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ChunkStore(str(tmp_path))
    first = store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32, seed=1)), meta={})
    put = store._put
    calls: list[str] = []

    def flaky_put(path: str, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        put(path, data)

    monkeypatch.setattr(store, "_put", flaky_put)
    with pytest.raises(OSError, match="disk full"):
        store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32, seed=2)), meta={})
    assert store.record(KEY) == first  # the earlier commit stands, untouched
    np.testing.assert_array_equal(store.read_frames(KEY), _frames(2, 18, 32, seed=1))
    assert sorted(p.name for p in (tmp_path / "chunks" / KEY).iterdir()) == sorted(
        ["COMMIT.json", first.attempt]
    )  # the failed attempt's folder was removed


def test_two_attempts_on_one_key_last_commit_wins(store: ChunkStore) -> None:
    first = store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32, seed=1)), meta={"n": 1})
    second = store.write_chunk(KEY, ChunkOutput(_frames(2, 18, 32, seed=2)), meta={"n": 2})

    assert first.attempt != second.attempt
    assert store.record(KEY) == second and store.is_complete(KEY, verify=True)
    np.testing.assert_array_equal(store.read_frames(KEY), _frames(2, 18, 32, seed=2))
    assert store.read_sidecar(KEY) == {"n": 2}
    # The losing attempt is complete too and was not deleted.
    assert store.fs.size(_file_url(store, first, "frames.mkv")) > 0


def test_racing_writers_leave_a_readable_chunk(store: ChunkStore) -> None:
    candidates = [_frames(2, 18, 32, seed=s) for s in range(3)]
    errors: list[BaseException] = []

    def write(frames: np.ndarray) -> None:
        try:
            store.write_chunk(KEY, ChunkOutput(frames), meta={})
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(f,)) for f in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.is_complete(KEY, verify=True)
    frames = store.read_frames(KEY)
    assert any(np.array_equal(frames, c) for c in candidates)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "0123456789abcde",  # 15 digits
        "0" * 65,
        "0123456789ABCDEF",
        "0123456789abcdeg",
        "../../../etc/passwd",
        "0123456789abcdef/../../x",
        "0123456789abcdef\n",
        "s3://other-bucket/x",
        123,
        None,
    ],
)
def test_refuses_keys_that_could_escape(key: Any, tmp_path: Path) -> None:
    store = ChunkStore(str(tmp_path))
    for call in (
        lambda: store.write_chunk(key, ChunkOutput(_frames(1, 2, 2)), meta={}),
        lambda: store.is_complete(key),
        lambda: store.record(key),
        lambda: store.read_frames(key),
        lambda: store.read_latents(key),
        lambda: store.read_sidecar(key),
        lambda: store.chunk_url(key),
        lambda: store.put_identity(key, b"x"),
        lambda: store.get_identity(key),
        lambda: store.has_identity(key),
    ):
        with pytest.raises(ValueError, match="`key`"):
            call()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "relpath", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "s3://b/x", "a\\b", "x::y"]
)
def test_refuses_relpaths_that_could_escape(relpath: str, tmp_path: Path) -> None:
    store = ChunkStore(str(tmp_path))
    with pytest.raises(ValueError, match="`relpath`"):
        store.write_bytes_atomic(relpath, b"x")
    with pytest.raises(ValueError, match="`relpath`"):
        store.read_bytes(relpath)


def test_refuses_bad_frames(tmp_path: Path) -> None:
    store = ChunkStore(str(tmp_path))
    bad = (
        np.zeros((2, 4, 4, 3), np.float32),
        np.zeros((4, 4, 3), np.uint8),
        np.zeros((0, 4, 4, 3), np.uint8),
    )
    for frames in bad:
        with pytest.raises(ValueError, match="`frames`"):
            store.write_chunk(KEY, ChunkOutput(frames), meta={})
    with pytest.raises(ValueError, match="`meta`"):
        store.write_chunk(KEY, ChunkOutput(_frames(1, 2, 2)), meta={"bad": object()})
    assert not store.is_complete(KEY)


def test_identity_put_get(store: ChunkStore) -> None:
    bundle = IdentityBundle(
        character="flame", key=OTHER_KEY, tensors={"rgba": torch.arange(12, dtype=torch.uint8)}
    )
    assert not store.has_identity(OTHER_KEY) and store.get_identity(OTHER_KEY) is None
    payload = bundle.to_bytes()  # not byte-stable across calls: the header order varies
    url = store.put_identity(OTHER_KEY, payload)

    assert url == store.url("identities", f"{OTHER_KEY}.safetensors")
    assert store.has_identity(OTHER_KEY)
    data = store.get_identity(OTHER_KEY)
    assert data == payload
    back = IdentityBundle.from_bytes(data)
    assert back.character == "flame" and torch.equal(back.tensors["rgba"], bundle.tensors["rgba"])


def test_write_bytes_atomic(store: ChunkStore) -> None:
    assert store.read_bytes("manifest.parquet") is None
    url = store.write_bytes_atomic("manifest.parquet", b"one")
    assert url == store.url("manifest.parquet")
    store.write_bytes_atomic("manifest.parquet", b"two")
    assert store.read_bytes("manifest.parquet") == b"two"
    store.write_bytes_atomic("reports/a/b.json", b"{}")
    assert store.read_bytes("reports/a/b.json") == b"{}"
    if os.path.isabs(store.root):  # local: no temporary files left behind
        assert sorted(os.listdir(store.root)) == ["manifest.parquet", "reports"]


def test_store_pickles_and_works_after_unpickling(store: ChunkStore) -> None:
    frames = _frames(2, 18, 32)
    store.write_chunk(KEY, ChunkOutput(frames), meta={})
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fs is None  # only the URL and options travel; the filesystem is rebuilt
    assert clone.root == store.root
    np.testing.assert_array_equal(clone.read_frames(KEY), frames)
    clone.write_chunk(OTHER_KEY, ChunkOutput(frames), meta={})
    assert store.is_complete(OTHER_KEY, verify=True)


def test_local_root_is_absolute_for_other_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = ChunkStore("out")
    assert store.root == str(tmp_path / "out") and store.root_url == store.root
    store.write_chunk(KEY, ChunkOutput(_frames(1, 2, 2)), meta={})
    monkeypatch.chdir("/")
    assert pickle.loads(pickle.dumps(store)).is_complete(KEY, verify=True)


_CHILD = """
import os, pickle, sys
from reelfarm.render.base import ChunkOutput
store, key, frames = pickle.load(sys.stdin.buffer)
record = store.write_chunk(key, ChunkOutput(frames), meta={"pid": os.getpid()})
sys.stdout.buffer.write(pickle.dumps(record))
"""


def test_chunk_written_by_another_process_is_seen_at_once(shared_store: ChunkStore) -> None:
    store = shared_store
    frames = _frames(2, 18, 32)
    assert not store.is_complete(KEY)  # warm any listing cache with the "absent" state
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=pickle.dumps((store, KEY, frames)),
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    record = pickle.loads(done.stdout)
    assert store.is_complete(KEY) and store.record(KEY) == record
    np.testing.assert_array_equal(store.read_frames(KEY), frames)
    assert store.read_sidecar(KEY)["pid"] != os.getpid()
