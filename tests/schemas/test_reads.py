"""The loader reads references, audio and base films only where the operator allows.

By default: the spec's own folder and below. More with ``allowed_roots=`` (the
``allowed_read_roots`` setting, ``REELFARM_ALLOWED_READ_ROOTS``). Audio is probed at load.
"""

from __future__ import annotations

import http.server
import os
import threading
import wave
from pathlib import Path

import pytest
import yaml

from reelfarm.errors import SpecError
from reelfarm.schemas import load_campaign, load_film, load_spec
from reelfarm.settings import Settings
from tests.schemas.conftest import write_png
from tests.schemas.test_spec_errors import FILM, edit

SETTING = "`allowed_read_roots` (REELFARM_ALLOWED_READ_ROOTS)"


def messages(path, load=load_film, **kw) -> list[str]:
    with pytest.raises(SpecError) as info:
        load(path, **kw)
    return [str(i) for i in info.value.issues]


@pytest.fixture
def outside(tmp_path_factory) -> Path:
    """A folder beside the spec's, with an image in it."""
    folder = tmp_path_factory.mktemp("outside")
    write_png(folder / "owl.png", (90, 60, 30))
    return folder


def with_ref(ref: str, text: str = FILM) -> str:
    return edit("{reference: moth.png}", "{reference: " + ref + "}", text)


# --- references ---------------------------------------------------------------------------
def test_a_reference_in_a_subfolder_loads(write_spec, refs):
    (refs / "refs").mkdir()
    write_png(refs / "refs" / "m.png", (1, 2, 3))
    film = load_film(write_spec(with_ref("refs/m.png")))
    assert film.characters["moth"].reference == str(refs / "refs" / "m.png")


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_a_reference_outside_the_spec_folder_is_refused(write_spec, outside, how):
    ref = str(outside / "owl.png") if how == "absolute" else f"../{outside.name}/owl.png"
    path = write_spec(with_ref(ref))
    assert messages(path) == [
        f"{path}:4 characters.moth.reference: character 'moth': {outside / 'owl.png'} is outside the "
        f"spec's folder and the allowed read roots; allow it with {SETTING}, got {ref!r}"
    ]
    film = load_film(path, allowed_roots=[str(outside)])
    assert film.characters["moth"].sha256


def test_a_symlink_that_leaves_the_spec_folder_is_refused(write_spec, refs, outside):
    os.symlink(outside / "owl.png", refs / "link.png")
    path = write_spec(with_ref("link.png"))
    (msg,) = messages(path)
    assert msg.startswith(f"{path}:4 characters.moth.reference: character 'moth': {refs / 'link.png'} "
                          f"(a link to {outside / 'owl.png'}) is outside"), msg
    assert load_film(path, allowed_roots=[str(outside)]).characters["moth"].sha256


def test_a_symlinked_spec_folder_is_its_own_folder(tmp_path, refs):
    link = tmp_path.parent / f"{tmp_path.name}-link"
    os.symlink(refs, link)
    (refs / "film.yaml").write_text(FILM)
    assert load_film(link / "film.yaml").characters["moth"].sha256


def test_an_allowed_root_is_a_folder_not_a_name_prefix(write_spec, outside):
    sibling = outside.parent / (outside.name + "-evil")
    sibling.mkdir()
    write_png(sibling / "owl.png", (1, 1, 1))
    path = write_spec(with_ref(str(sibling / "owl.png")))
    assert SETTING in messages(path, allowed_roots=[str(outside)])[0]


class _Counting(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(outside):
    handler = lambda *a, **kw: _Counting(*a, directory=str(outside), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Counting.hits = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_reference_is_not_fetched_unless_allowed(write_spec, http_root):
    url = f"{http_root}/owl.png"
    path = write_spec(with_ref(url))
    assert messages(path) == [
        f"{path}:4 characters.moth.reference: character 'moth': {url} is outside the spec's folder and "
        f"the allowed read roots; allow it with {SETTING}, got {url!r}"
    ]
    assert _Counting.hits == []
    # A URL prefix is matched at a `/`: `http://host:port/` allows everything the server has.
    film = load_film(path, allowed_roots=[http_root + "/"])
    assert film.characters["moth"].sha256 and _Counting.hits


def test_a_memory_spec_reads_its_own_folder_but_not_another(write_spec, refs):
    import uuid

    import fsspec

    root = f"memory://reads-{uuid.uuid4().hex}"
    other = f"memory://other-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        for name in ("moth.png", "flame.png"):
            fs.pipe(f"{root}/film/{name}", (refs / name).read_bytes())
        fs.pipe(f"{other}/owl.png", (refs / "moth.png").read_bytes())
        fs.pipe(f"{root}/film/film.yaml", FILM.encode())
        assert load_film(f"{root}/film/film.yaml").characters["moth"].sha256
        fs.pipe(f"{root}/film/bad.yaml", with_ref(f"{other}/owl.png").encode())
        (msg,) = messages(f"{root}/film/bad.yaml")
        assert SETTING in msg
        fs.pipe(f"{root}/film/up.yaml", with_ref("../moth.png").encode())
        fs.pipe(f"{root}/moth.png", (refs / "moth.png").read_bytes())
        (msg,) = messages(f"{root}/film/up.yaml")
        assert SETTING in msg
        assert load_film(f"{root}/film/bad.yaml", allowed_roots=[other]).characters["moth"].sha256
    finally:
        for r in (root, other):
            if fs.exists(r):
                fs.rm(r, recursive=True)


def test_references_are_confined_without_hashing_too(write_spec, outside):
    # The planner's workers read references later: the check does not depend on hashing.
    path = write_spec(with_ref(str(outside / "owl.png")))
    assert SETTING in messages(path, hash_references=False)[0]


# --- campaigns -------------------------------------------------------------------------------
def write_campaign(folder: Path, film: str, override_ref: str | None = None) -> Path:
    matrix = {"aspect": {"wide": {"film": {"resolution": [64, 36]}}}}
    if override_ref:
        matrix["aspect"]["wide"]["film"]["characters"] = {"moth": {"reference": override_ref}}
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump({"reelfarm": 1, "campaign": "c", "film": film, "matrix": matrix},
                                   sort_keys=False))
    return path


def test_a_campaign_base_film_outside_is_refused(refs, outside):
    (outside / "base.yaml").write_text(FILM.replace("moth.png", "owl.png").replace("flame.png", "owl.png"))
    path = write_campaign(refs, str(outside / "base.yaml"))
    assert messages(path, load_campaign) == [
        f"{path}:3 film: {outside / 'base.yaml'} is outside the spec's folder and the allowed read roots; "
        f"allow it with {SETTING}, got {str(outside / 'base.yaml')!r}"
    ]
    loaded = load_campaign(path, allowed_roots=[str(outside)])
    assert len(loaded.cells) == 1


def test_a_campaign_override_reference_outside_is_refused(refs, outside):
    (refs / "film.yaml").write_text(FILM)
    path = write_campaign(refs, "film.yaml", override_ref=str(outside / "owl.png"))
    (msg,) = messages(path, load_campaign)
    assert msg.startswith(f"{path}:13 characters.moth.reference: (cell wide) character 'moth': "), msg
    assert SETTING in msg
    assert load_spec(path, allowed_roots=[str(outside)]).cells[0].film.characters["moth"].sha256


# --- the setting -----------------------------------------------------------------------------
def test_the_setting_reads_a_list_from_the_environment(monkeypatch):
    assert Settings().allowed_read_roots == []
    monkeypatch.setenv("REELFARM_ALLOWED_READ_ROOTS", "/data/refs, s3://studio-refs/")
    assert Settings().allowed_read_roots == ["/data/refs", "s3://studio-refs/"]
    monkeypatch.setenv("REELFARM_ALLOWED_READ_ROOTS", '["/a,b", "/c"]')
    assert Settings().allowed_read_roots == ["/a,b", "/c"]


# --- audio -----------------------------------------------------------------------------------
def write_wav(path: Path, seconds: float = 0.2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * int(8000 * seconds))
    return path


def with_audio(value: str) -> str:
    return edit("title: Moth and flame\n", f"title: Moth and flame\naudio: {value}\n")


def test_a_wav_soundtrack_loads(write_spec, refs):
    write_wav(refs / "score.wav")
    film = load_film(write_spec(with_audio("score.wav")))
    assert film.audio == str(refs / "score.wav")


def test_a_file_that_is_not_audio_is_refused_at_load(write_spec, refs):
    (refs / "notes.wav").write_text("root:x:0:0:root:/root:/bin/bash\n")
    path = write_spec(with_audio("notes.wav"))
    assert messages(path) == [
        f"{path}:3 audio: `audio` {refs / 'notes.wav'} is not a sound file (wav, flac, ogg, mp3, aac, "
        "mp4/m4a or mkv/webm), got 'notes.wav'"
    ]


def test_a_video_without_an_audio_stream_is_refused_at_load(write_spec, refs):
    import av
    import numpy as np

    with av.open(str(refs / "silent.mkv"), "w") as out:
        stream = out.add_stream("ffv1", rate=24)
        stream.width = stream.height = 16
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    path = write_spec(with_audio("silent.mkv"))
    assert messages(path) == [
        f"{path}:3 audio: `audio` {refs / 'silent.mkv'} has no audio stream, got 'silent.mkv'"
    ]


def test_etc_passwd_as_audio_is_refused(write_spec):
    path = write_spec(with_audio("/etc/passwd"))
    (msg,) = messages(path)
    assert msg.startswith(f"{path}:3 audio: ") and "/etc/passwd" in msg, msg
    (msg,) = messages(path, allowed_roots=["/etc"])
    assert msg == (f"{path}:3 audio: `audio` /etc/passwd is not a sound file (wav, flac, ogg, mp3, aac, "
                   "mp4/m4a or mkv/webm), got '/etc/passwd'")
