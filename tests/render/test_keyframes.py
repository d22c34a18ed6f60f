"""Keyframes composed from references (a tiny random-weight Flux Kontext saved and loaded back with
from_pretrained) or pinned to a file: spec checks, content keys, the keyframe stage (each keyframe
rendered once), pixels of a pinned keyframe, the first chunk starting from it, review files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reelfarm.cluster.store import ChunkStore
from reelfarm.errors import BackendError, SpecError
from reelfarm.flows.keyframes import keyframe_sheet, render_keyframes
from reelfarm.flows.plan import plan_film
from reelfarm.render.keyframes import KeyframeRenderer, collage, decode_image
from reelfarm.schemas.film import Film, KeyframeModel
from reelfarm.schemas.loader import load_film
from tests.films import write_film
from tests.render import tiny_kontext as tk
from tests.render import tiny_pipelines as tp

SIZE = 32
KONTEXT = {"family": "flux_kontext", "steps": tk.KONTEXT_STEPS, "dtype": "float32", "max_sequence_length": 16}
EXPECTED = [[139, 122, 133], [118, 125, 135], [120, 142, 167]]  # keyframe of s01_020 at (0, 0), (16, 16), (31, 31)
SHOTS = [
    {"id": "s01_010", "frames": 9, "prompt": "a candle flame at night", "characters": ["flame"]},
    {"id": "s01_020", "frames": 9, "prompt": "a moth meets the flame", "characters": ["flame", "moth"],
     "keyframe": {"prompt": "the moth and the flame side by side on a shelf"}},
]


@pytest.fixture(scope="session")
def kontext() -> str:
    return str(tk.kontext_dir())


@pytest.fixture(scope="session")
def renderer(kontext) -> KeyframeRenderer:
    return KeyframeRenderer.load(KeyframeModel(id=kontext, **KONTEXT), device="cpu")


def _wan() -> dict:
    return {"backend": "diffusers", "family": "wan", "id": str(tp.saved_model_dir("wan")), "steps": 2,
            "dtype": "float32", "chunk_frames": 9, "overlap": 1}


def _film(folder: Path, kontext: str, *, shots: list | None = None, **top):
    top.setdefault("keyframe", {"model": {"id": kontext, **KONTEXT}})
    spec = write_film(folder, shots=shots or SHOTS, resolution=[SIZE, SIZE], model=_wan(), **top)
    return load_film(spec)


def _references(plan) -> dict[str, np.ndarray]:
    return {n: decode_image(Path(u).read_bytes(), n) for n, u in plan.references.items()}


# --- composing -----------------------------------------------------------------------------------
def test_kontext_composes_the_keyframe_from_the_collage_and_prompt(tmp_path, kontext, renderer):
    plan = plan_film(_film(tmp_path, kontext))
    shot = plan.shot("s01_020")
    image = collage(shot, _references(plan))
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    frame = renderer(shot, image)
    assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, renderer(shot, image))  # same seed, same pixels
    # Pinned values (recorded on this CPU build), so a silent change in the path fails loudly.
    np.testing.assert_allclose(frame[[0, 16, 31], [0, 16, 31]].astype(int), EXPECTED, atol=2)
    assert not np.array_equal(frame, image)  # composed by the model, not the collage passed through
    # Another prompt (the shot's own, in its keyframe plan) or another start image: other pixels.
    other = shot.model_copy(update={"keyframe": shot.keyframe.model_copy(update={"prompt": "a dark night"})})
    assert not np.array_equal(frame, renderer(other, image))
    assert not np.array_equal(frame, renderer(shot, image[::-1].copy()))


def test_a_video_pipeline_folder_is_not_a_keyframe_model(tmp_path):
    model = KeyframeModel(id=str(tk.not_an_editor_dir()), **KONTEXT)
    with pytest.raises(BackendError, match=r"is not an image-editing pipeline of its family: the folder holds "
                                           r"a WanImageToVideoPipeline, flux_kontext takes a FluxKontextPipeline"):
        KeyframeRenderer.load(model, device="cpu")


def test_a_keyframe_model_that_cannot_be_loaded_names_the_shots_before_any_chunk(tmp_path, kontext, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    film = _film(tmp_path, kontext, keyframe={"model": {**KONTEXT, "id": "studio/no-such-kontext"}})
    store = ChunkStore(str(tmp_path / "out"))
    with pytest.raises(BackendError, match=r"^shots 's01_010', 's01_020': `keyframe.model.id` "
                                           r"'studio/no-such-kontext' cannot be loaded: model "
                                           r"`studio/no-such-kontext` \(family `flux_kontext`\) is not a local "
                                           r"folder and is not reachable on the hub"):
        render_keyframes([plan_film(film)], store, isolate=False)
    assert not list((tmp_path / "out").rglob("COMMIT.json"))


# --- content keys --------------------------------------------------------------------------------
def test_keyframe_keys_follow_what_composes_them(tmp_path, kontext):
    base = plan_film(_film(tmp_path / "a", kontext))
    k1, k2 = (base.shot(s).keyframe.key for s in ("s01_010", "s01_020"))
    assert k1 != k2 and base.shot("s01_010").keyframe.prompt == "a candle flame at night"
    # The keyframe key is in every chunk key of its shot; a film without keyframes keeps its keys.
    plain = plan_film(load_film(write_film(tmp_path / "p", shots=SHOTS[:1], resolution=[SIZE, SIZE], model=_wan())))
    assert plain.shot("s01_010").keyframe is None
    assert plain.shot("s01_010").chunks[0].key != base.shot("s01_010").chunks[0].key

    def keys(folder, **kw):
        p = plan_film(_film(tmp_path / folder, kontext, **kw))
        return p.shot("s01_010").keyframe.key, p.shot("s01_020").keyframe.key

    assert keys("same") == (k1, k2)  # another folder, same content: same keys
    assert keys("seed", seed=8) != (k1, k2)
    steps = {"model": {"id": kontext, **KONTEXT, "steps": 3}}
    assert keys("steps", keyframe=steps) != (k1, k2)
    # The references' content: a changed moth changes only the keyframe that shows the moth.
    changed = _film(tmp_path / "moth", kontext)
    Image.new("RGBA", (48, 48), (10, 200, 30, 255)).save(Path(changed.characters["moth"].reference))
    p = plan_film(load_film(tmp_path / "moth" / "film.yaml"))
    assert (p.shot("s01_010").keyframe.key, p.shot("s01_020").keyframe.key) != (k1, k2)
    assert p.shot("s01_010").keyframe.key == k1


# --- the stage -----------------------------------------------------------------------------------
def test_each_keyframe_is_rendered_once_and_committed_as_a_chunk(tmp_path, kontext, renderer):
    plan = plan_film(_film(tmp_path / "spec", kontext))
    store = ChunkStore(str(tmp_path / "out"))
    first = render_keyframes([plan], store, isolate=False)
    assert (len(first.rendered), len(first.cached), first.model_loads) == (2, 0, 1)
    again = render_keyframes([plan, plan], store, isolate=False)  # e.g. two campaign cells
    assert (len(again.rendered), len(again.cached), again.model_loads) == (0, 2, 0)
    shot = plan.shot("s01_020")
    stored = store.read_frames(shot.keyframe.key)
    assert stored.shape == (1, SIZE, SIZE, 3)
    # What the stage committed is what the model makes (lossless store, same seed).
    np.testing.assert_array_equal(stored[0], renderer(shot, collage(shot, _references(plan))))
    side = store.read_sidecar(shot.keyframe.key)
    assert side["keyframe"] is True and side["source"] == "model" and side["shot"] == "s01_020"
    sheet = Image.open(__import__("io").BytesIO(keyframe_sheet(plan, store)))
    assert sheet.size[0] > 2 * 16


def _pin_film(folder: Path, pixels: np.ndarray, *, name: str = "pin.png", **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / name)
    shots = [{**SHOTS[0], "keyframe": {"pin": name, **extra}}]
    return write_film(folder, shots=shots, resolution=[SIZE, SIZE], model=_wan())


def test_a_pinned_keyframe_is_used_as_given(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    film = load_film(_pin_film(tmp_path / "spec", pixels))
    assert Film.model_validate_json(film.model_dump_json()) == film  # film.json, read back by resume
    plan = plan_film(film)
    kf = plan.shot("s01_010").keyframe
    assert kf.source == "pin" and kf.pin_sha256
    store = ChunkStore(str(tmp_path / "out"))
    summary = render_keyframes([plan], store, isolate=False)
    assert (summary.pinned, summary.rendered, summary.model_loads) == ([kf.key], [], 0)
    np.testing.assert_array_equal(store.read_frames(kf.key)[0], pixels)  # pixel for pixel
    # Another file, another key; the same bytes elsewhere, the same key.
    other = plan_film(load_film(_pin_film(tmp_path / "other", pixels[::-1].copy())))
    same = plan_film(load_film(_pin_film(tmp_path / "same", pixels, name="elsewhere.png")))
    assert other.shot("s01_010").keyframe.key != kf.key == same.shot("s01_010").keyframe.key


def test_the_first_chunk_starts_from_the_shot_keyframe(tmp_path):
    """Through the worker's real path (no Ray): the chunk is given the committed keyframe."""
    from reelfarm.cluster.worker import ChunkWorker
    from reelfarm.render.identity import identity_key

    pixels = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    film = load_film(_pin_film(tmp_path / "spec", pixels))
    plan = plan_film(film)
    shot = plan.shot("s01_010")
    store = ChunkStore(str(tmp_path / "out"))
    render_keyframes([plan], store, isolate=False)
    worker = ChunkWorker("w")
    ref = Path(plan.references["flame"]).read_bytes()
    sha = plan.characters["flame"]
    bundle = worker.encode_identity(shot.model, "flame", ref, sha, identity_key(shot.model, sha), store)
    worker.render(shot, shot.chunks[0], store, ["flame"], bundle)
    assert store.read_sidecar(shot.chunks[0].key)["start"] == "given keyframe"
    # The same shot without its keyframe starts from the animatic's: other pixels.
    bare = shot.model_copy(update={"keyframe": None})
    reply = worker.render(bare, shot.chunks[0].model_copy(update={"key": "0" * 32}), store, ["flame"], bundle)
    assert store.read_sidecar(reply.record.key)["start"] == "keyframe"
    assert not np.array_equal(store.read_frames("0" * 32), store.read_frames(shot.chunks[0].key))
    worker.close()


# --- bad input: file:line field: message, got value, before any chunk ------------------------------
def _spec(tmp_path: Path, text: str) -> Path:
    write_film(tmp_path, shots=SHOTS[:1])  # the references
    path = tmp_path / "kf.yaml"
    path.write_text(textwrap.dedent(text))
    return path


HEAD = """\
    reelfarm: 1
    title: keyframes
    resolution: [32, 32]
    model: {backend: diffusers, family: wan, id: org/wan, chunk_frames: 9, overlap: 1}
    characters:
      flame: {reference: refs/flame.png}
"""


def _issues(path: Path) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_film(path)
    return [str(i) for i in e.value.issues]


def test_a_keyframe_model_that_is_not_an_image_editing_pipeline_is_refused(tmp_path):
    wrong = tk.not_an_editor_dir()
    path = _spec(tmp_path, HEAD + f"""\
    keyframe:
      model: {{family: flux_kontext, id: {wrong}}}
    scenes:
      - id: s01
        shots:
          - {{id: s01_010, frames: 9, prompt: a flame, characters: [flame]}}
    """)
    assert _issues(path) == [
        f"{path}:8 keyframe.model.id: `keyframe.model.id` is not an image-editing pipeline of family "
        f"'flux_kontext': {wrong} holds a WanImageToVideoPipeline, flux_kontext takes a FluxKontextPipeline"]


def test_qwen_image_edit_plus_is_refused_with_the_reason(tmp_path):
    path = _spec(tmp_path, HEAD + """\
    scenes:
      - id: s01
        shots:
          - id: s01_010
            frames: 9
            prompt: a flame
            characters: [flame]
            keyframe: {model: {family: qwen_image_edit_plus, id: Qwen/Qwen-Image-Edit-2509}}
    """)
    (issue,) = _issues(path)
    assert issue.startswith(f"{path}:14 scenes[0].shots[0].keyframe.model.family: ")
    assert "`qwen_image_edit_plus` (QwenImageEditPlusPipeline, several images) is not supported yet" in issue


@pytest.mark.parametrize("case", ["not_image", "wrong_size", "transparent", "outside"])
def test_a_bad_pinned_keyframe_names_the_shot_field_and_value(tmp_path, case):
    folder = tmp_path / "spec"
    folder.mkdir()
    pin = "pin.png"
    if case == "not_image":
        (folder / pin).write_bytes(b"not a png at all")
    elif case == "wrong_size":
        Image.new("RGB", (48, 32), "red").save(folder / pin)
    elif case == "transparent":
        Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(folder / pin)
    else:
        Image.new("RGB", (32, 32), "red").save(tmp_path / pin)
        pin = f"../{pin}"
    path = _spec(folder, HEAD + f"""\
    scenes:
      - id: s01
        shots:
          - id: s01_010
            frames: 9
            prompt: a flame
            characters: [flame]
            keyframe: {{pin: {pin}}}
    """)
    (issue,) = _issues(path)
    where = f"{path}:14 scenes[0].shots[0].keyframe.pin: shot 's01_010': "
    url = str((folder / pin).resolve()) if case != "outside" else None
    expected = {
        "not_image": f"pinned keyframe is not a readable image: {url} (UnidentifiedImageError), got 'pin.png'",
        "wrong_size": f"pinned keyframe must be the film's size 32x32: {url} is 48x32, got 'pin.png'",
        "transparent": f"pinned keyframe must be opaque (it is used as given): {url} has transparent pixels, "
                       "got 'pin.png'",
        "outside": f"`keyframe.pin` {tmp_path / 'pin.png'} is outside the spec's folder and the allowed read "
                   "roots; allow it with `allowed_read_roots` (REELFARM_ALLOWED_READ_ROOTS), got '../pin.png'",
    }[case]
    assert issue == where + expected


@pytest.mark.parametrize(("written", "expected"), [
    ("bogus", "keyframe: Input should be 'animatic', got 'bogus'"),
    ("{model: {family: flux_kontext}}", "keyframe.model.id: missing field `id`"),
    ("{prompt: hi}", "keyframe: give exactly one of `model` (an image-editing pipeline) or `pin` (an image file)"),
    ("{pin: a.png, prompt: x}", "keyframe: a pinned keyframe is used as given: `prompt` is for a keyframe `model`"),
    ("{model: {family: flux_kontxt, id: a/b}}",
     "keyframe.model.family: Input should be 'flux_kontext', got 'flux_kontxt'; did you mean 'flux_kontext'?"),
])
def test_keyframe_block_errors(tmp_path, written, expected):
    path = _spec(tmp_path, HEAD + f"""\
    scenes:
      - id: s01
        shots:
          - id: s01_010
            frames: 9
            prompt: a flame
            characters: [flame]
            keyframe: {written}
    """)
    assert _issues(path) == [f"{path}:14 scenes[0].shots[0].{expected}"]


def test_keyframes_where_they_cannot_be_used(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "pin.png")
    path = _spec(tmp_path, HEAD + """\
    keyframe: {pin: pin.png}
    scenes:
      - id: s01
        shots:
          - id: s01_010
            frames: 9
            prompt: a flame
            model: {backend: animatic}
            keyframe: {pin: pin.png}
    """)
    assert _issues(path) == [
        f"{path}:7 keyframe.pin: a pinned keyframe is one shot's first frame: set `keyframe.pin` on the shot, "
        "got 'pin.png'",
        f"{path}:15 scenes[0].shots[0].keyframe: shot 's01_010': a keyframe is the first frame a diffusers model "
        "starts from; this shot renders with the animatic (`model.backend`); remove `keyframe` or render it "
        "with diffusers"]


def test_a_shot_may_keep_the_animatic_keyframe(tmp_path, kontext):
    shots = [{**SHOTS[0], "keyframe": "animatic"}, SHOTS[1]]
    plan = plan_film(_film(tmp_path, kontext, shots=shots))
    assert plan.shot("s01_010").keyframe is None and plan.shot("s01_020").keyframe is not None
