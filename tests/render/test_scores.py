"""Identity and continuity scores (render.scores) on real animatic renders of the Herd,
and the learned score through a tiny random-weight CLIP vision tower saved and loaded back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reelfarm.flows.plan import plan_film
from reelfarm.render import scores
from reelfarm.render.animatic import AnimaticBackend
from reelfarm.render.base import Condition
from reelfarm.render.seams import seam_score
from reelfarm.schemas.loader import load_film

HERD = Path(__file__).resolve().parents[2] / "examples" / "the_herd" / "film.yaml"


@pytest.fixture(scope="module")
def herd():
    # Half the spec's 768 x 432: staging is proportional to the frame, and the test stays fast.
    plan = plan_film(load_film(str(HERD)).model_copy(update={"resolution": (384, 216)}))
    backend = AnimaticBackend()
    bundles = {}
    for name, sha in plan.characters.items():
        with Image.open(io.BytesIO(Path(plan.references[name]).read_bytes())) as im:
            bundles[name] = backend.encode_identity(name, np.asarray(im.convert("RGBA")), sha)
    return plan, backend, bundles


def _sampled(backend, shot, chunk, bundles, count: int = 4) -> np.ndarray:
    """The chunk's frames with only the scored ones drawn (the rest black): an animatic frame
    is the same whichever chunk draws it, and drawing 4 frames instead of 48 keeps this fast."""
    out = np.zeros((chunk.num_frames, shot.height, shot.width, 3), np.uint8)
    for i in scores.sample_frames(chunk, count):
        one = chunk.model_copy(update={"frame_start": chunk.frame_start + i, "frame_end": chunk.frame_start + i + 1,
                                       "num_frames": 1})
        out[i] = backend(shot, one, bundles).frames[0]
    return out


def test_region_score_ranks_the_right_character_first_in_every_shot(herd):
    plan, backend, bundles = herd
    margins = []
    for shot in plan.shots:
        for chunk in shot.chunks:
            frames = _sampled(backend, shot, chunk, bundles, 3)
            local = scores.sample_frames(chunk, 3)
            regions = scores.character_regions(shot, bundles, [chunk.frame_start + i for i in local])
            for name in shot.characters:
                assert any(r is not None for r in regions[name]), (shot.shot_id, name)
                for i, region in zip(local, regions[name], strict=True):
                    if region is None:
                        continue
                    got = {other: scores.region_similarity(frames[i], region, b) for other, b in bundles.items()}
                    best = max(got, key=got.get)
                    assert best == name, (shot.shot_id, chunk.name, i, got)
                    margins.append(got[name] - max(v for k, v in got.items() if k != name))
    assert len(margins) >= 3 * 14 and min(margins) > 0.4


def test_region_score_drops_when_the_wrong_character_is_drawn(herd):
    plan, backend, bundles = herd
    shot = plan.shot("plain_020")  # calf and buffalo
    chunk = shot.chunks[0]
    swapped = {"calf": bundles["buffalo"], "buffalo": bundles["calf"]}
    right = scores.score_chunk(shot, chunk, _sampled(backend, shot, chunk, bundles), bundles)
    wrong = scores.score_chunk(shot, chunk, _sampled(backend, shot, chunk, swapped), bundles)
    assert right.identity() > 0.9
    assert wrong.identity() < 0.5
    assert right.per_character()["calf"] - wrong.per_character()["calf"] > 0.5


def test_chunk_scores_pinned(herd):
    plan, backend, bundles = herd
    shot = plan.shot("plain_030")  # three characters, two rows, a pull-out
    chunk = shot.chunks[1]
    s = scores.score_chunk(shot, chunk, _sampled(backend, shot, chunk, bundles), bundles)
    assert s.frames == [40, 56, 71, 87]
    assert sorted(s.region) == ["buffalo", "calf", "goat"]
    pinned = {name: round(v, 3) for name, v in s.per_character().items()}
    assert pinned == pytest.approx({"buffalo": 0.948, "calf": 0.956, "goat": 0.956}, abs=0.003)
    assert s.continuity_score() > 0.95 and s.seam is None  # the animatic chains nothing
    doc = s.to_doc()
    assert doc["frames"] == s.frames and doc["seam"] is None and "embedding" not in doc


def test_back_row_is_partly_hidden(herd):
    plan, _, bundles = herd
    shot = plan.shot("plain_030")
    regions = scores.character_regions(shot, bundles, [0])
    calf = regions["calf"][0]  # i = 1 of 3: the back row, drawn first
    assert calf is not None and 0 < calf.visible < float((calf.weights > 0).sum())


def test_seam_score_of_a_chained_chunk(herd):
    plan, backend, bundles = herd
    shot = plan.shot("plain_010")
    first, second = shot.chunks[:2]
    frames = backend(shot, second, bundles).frames
    chained = second.model_copy(update={"depends_on": first.key})
    prev = backend(shot, first, bundles).frames
    good = Condition(image=prev[second.frame_start - first.frame_start])
    smooth = scores.chunk_seam(shot, chained, frames, good)
    assert smooth == pytest.approx(seam_score(0.0, float(np.mean(np.abs(np.diff(
        frames[: second.frame_end - second.frame_start].astype(np.int16), axis=0))))))
    jump = scores.chunk_seam(shot, chained, frames, Condition(image=np.zeros_like(frames[0])))
    assert smooth < 1.0 < 10.0 < jump
    assert scores.chunk_seam(shot, second, frames, good) is None  # not chained: no seam


# --- the learned score ------------------------------------------------------------------------
def _tiny_clip(path: Path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(path)
    return model


def test_embedding_score_through_a_tiny_clip_saved_and_loaded(herd, tmp_path):
    plan, backend, bundles = herd
    stock = _tiny_clip(tmp_path / "clip")
    embedder = scores.Embedder(str(tmp_path / "clip"))
    assert embedder.size == 32
    # The model loaded back computes what the one built in code does, bit for bit.
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(stock(pixel_values=x).image_embeds, embedder.model(pixel_values=x).image_embeds)
    ref = scores.reference_crop(bundles["goat"])
    assert embedder.similarity([ref], ref) == [pytest.approx(1.0, abs=1e-5)]
    shot = plan.shot("river_030")
    chunk = shot.chunks[0]
    frames = _sampled(backend, shot, chunk, bundles)
    s = scores.score_chunk(shot, chunk, frames, bundles, embedder=embedder)
    assert sorted(s.embedding) == ["buffalo", "calf", "goat"]
    values = [v for vs in s.embedding.values() for v in vs]
    assert len(values) == 12 and all(v is not None and 0.0 <= v <= 1.0 for v in values)
    assert s.identity("embedding") == min(s.per_character("embedding").values())
    assert s.identity("embedding") != s.identity("region")
    again = scores.score_chunk(shot, chunk, frames, bundles, embedder=scores.load_embedder(str(tmp_path / "clip")))
    assert again.embedding == s.embedding  # deterministic across loads
    assert "embedding" in s.to_doc()
