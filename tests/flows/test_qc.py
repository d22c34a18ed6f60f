"""Automatic retakes: the qc policy, take keys in the plan, and the worker's take loop.

Real parts: the Herd's spec and references, the animatic backend, a ChunkStore on disk and
the ChunkWorker class itself (called in-process: the take loop lives inside one call).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reelfarm.cluster.store import ChunkStore
from reelfarm.cluster.worker import ChunkWorker
from reelfarm.errors import SpecError
from reelfarm.flows.plan import plan_film
from reelfarm.render import charts, review, timeline
from reelfarm.render.identity import identity_key
from reelfarm.render.quality import shot_qc
from reelfarm.schemas.loader import load_film
from reelfarm.schemas.manifest import plan_rows, rows_to_table, table_to_rows
from reelfarm.schemas.qc import QcPolicy, qc_reasons, take_key, take_seed

HERD = Path(__file__).resolve().parents[2] / "examples" / "the_herd" / "film.yaml"


def _film(qc: QcPolicy | None, shot_qc: QcPolicy | None = None):
    film = load_film(str(HERD))
    # Small frames, two shots: the take loop is what is under test, not the drawing.
    scenes = tuple(s.model_copy(update={"shots": tuple(
        sh.model_copy(update={"qc": shot_qc}) if sh.id == "river_020" else sh for sh in s.shots
        if sh.id in ("plain_010", "river_020"))}) for s in film.scenes)
    return film.model_copy(update={"qc": qc, "resolution": (192, 108), "scenes": scenes})


class _Takes:
    """Wraps the loaded backend: counts calls and spoils takes by seed (noise of a given size)."""

    def __init__(self, inner, noise: dict[int, float]):
        self.inner, self.noise, self.calls = inner, noise, []

    def __call__(self, shot, chunk, identities, condition=None):
        self.calls.append((chunk.name, chunk.seed))
        out = self.inner(shot, chunk, identities, condition)
        amount = self.noise.get(chunk.seed, 0.0)
        if amount:
            rng = np.random.default_rng(chunk.seed % 2**32)
            noisy = out.frames.astype(np.float32) + rng.normal(0, amount, out.frames.shape)
            out.frames = np.clip(noisy, 0, 255).astype(np.uint8)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _worker(plan, store: ChunkStore, noise: dict[int, float] | None = None):
    worker = ChunkWorker("test/cpu-0")
    model = plan.shots[0].model
    worker._ensure(model)
    bundles = {}
    for name, sha in plan.characters.items():
        data = Path(plan.references[name]).read_bytes()
        bundles[name] = worker.encode_identity(model, name, data, sha, identity_key(model, sha), store)
    worker._backend = _Takes(worker._backend, noise or {})
    return worker, bundles


def _render_all(worker, plan, store, bundles):
    replies = {}
    for shot in plan.shots:
        for chunk in shot.chunks:
            replies[chunk.key] = worker.render(shot, chunk, store, list(shot.characters),
                                               *[bundles[n] for n in shot.characters])
    return replies


def test_policy_schema_and_reasons():
    with pytest.raises(ValueError, match="`metric` 'embedding' needs `embedding_model`"):
        QcPolicy(metric="embedding")
    with pytest.raises(ValueError):
        QcPolicy(takes=9)
    p = QcPolicy(min_identity=0.9, max_seam=2.0, takes=3)
    assert qc_reasons(p, 0.95, 1.0) == []
    assert qc_reasons(p, 0.5, 3.0) == ["identity 0.5000 < `min_identity` 0.9", "seam 3.0000 > `max_seam` 2"]
    assert qc_reasons(None, 0.0, 99.0) == []
    # Take 1 is the chunk as planned; later takes get their own seed and key.
    assert take_seed(123, 1) == 123 and take_seed(123, 2) != take_seed(123, 3) != 123
    assert take_key("a" * 32, 2) != take_key("a" * 32, 3) and len(take_key("a" * 32, 2)) == 32


def test_spec_error_names_the_field(tmp_path):
    text = HERD.read_text().replace("model:\n  backend: animatic\n",
                                    "model:\n  backend: animatic\nqc:\n  takes: 20\n")
    (tmp_path / "refs").symlink_to(HERD.parent / "refs")
    spec = tmp_path / "film.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError) as e:
        load_film(str(spec))
    assert "qc.takes" in str(e.value) and "20" in str(e.value)


def test_take_number_in_content_key_only_when_takes_can_differ():
    base = plan_film(_film(None))
    one = plan_film(_film(QcPolicy(min_identity=0.99)))  # one take: flags only
    three = plan_film(_film(QcPolicy(min_identity=0.99, takes=3)))
    shot_only = plan_film(_film(None, shot_qc=QcPolicy(takes=2)))
    keys = [c.key for c in base.chunks]
    assert [c.key for c in one.chunks] == keys  # adding a flag-only policy renders nothing again
    assert all(a != b for a, b in zip(keys, [c.key for c in three.chunks], strict=True))
    # The shot's own policy changes only that shot's keys.
    changed = [a != b for a, b in zip(base.chunks, shot_only.chunks, strict=True)]
    assert changed == [c.name.startswith("river_020") for c in base.chunks]
    assert shot_only.shot("river_020").qc == QcPolicy(takes=2) and shot_only.shot("plain_010").qc is None


def test_unmeetable_policy_uses_every_take_keeps_the_best_and_flags(tmp_path):
    plan = plan_film(_film(QcPolicy(min_identity=1.0, takes=3)))
    store = ChunkStore(str(tmp_path / "out"))
    # Take 2 is clean; takes 1 and 3 are spoilt (3 less than 1): the best is take 2.
    noise = {}
    for c in plan.chunks:
        noise[take_seed(c.seed, 1)] = 60.0
        noise[take_seed(c.seed, 3)] = 25.0
    worker, bundles = _worker(plan, store, noise)
    replies = _render_all(worker, plan, store, bundles)
    assert len(worker._backend.calls) == 3 * len(plan.chunks)
    for c in plan.chunks:
        reply = replies[c.key]
        assert (reply.take, reply.takes) == (2, 3)
        assert reply.qc["take"] == 2 and reply.qc["takes"] == 3
        assert reply.qc["qc_flag"].startswith("identity 0.") and "< `min_identity` 1" in reply.qc["qc_flag"]
        doc = json.loads(reply.qc["scores"])
        assert [t["take"] for t in doc["takes"]] == [1, 2, 3]
        ids = [t["identity"] for t in doc["takes"]]
        assert ids[1] > ids[2] > ids[0]  # the spoilt takes score lower, the worse one lowest
        assert reply.qc["identity_score"] == pytest.approx(ids[1])
        assert all("`min_identity` 1" in t["reasons"][0] for t in doc["takes"])
        # Every take stays in storage under its own key; the chunk's key holds the best.
        for t in (1, 2, 3):
            assert store.is_complete(take_key(c.key, t), verify=True)
            assert store.read_sidecar(take_key(c.key, t))["take"] == t
        side = store.read_sidecar(c.key)
        assert side["qc"]["take"] == 2 and side["seed"] == take_seed(c.seed, 2)
        assert np.array_equal(store.read_frames(c.key), store.read_frames(take_key(c.key, 2)))


def test_policy_every_chunk_meets_adds_no_renders(tmp_path):
    plan = plan_film(_film(QcPolicy(min_identity=0.5, takes=3)))
    store = ChunkStore(str(tmp_path / "out"))
    worker, bundles = _worker(plan, store)
    replies = _render_all(worker, plan, store, bundles)
    assert len(worker._backend.calls) == len(plan.chunks)  # counted: one render per chunk
    assert [seed for _, seed in worker._backend.calls] == [c.seed for c in plan.chunks]
    for c in plan.chunks:
        assert replies[c.key].takes == 1 and replies[c.key].qc["qc_flag"] is None
        assert replies[c.key].qc["identity_score"] > 0.9
        assert not store.is_complete(take_key(c.key, 1))  # nothing stored beside the chunk


def test_no_policy_still_scores_every_chunk(tmp_path):
    plan = plan_film(_film(None))
    store = ChunkStore(str(tmp_path / "out"))
    worker, bundles = _worker(plan, store)
    replies = _render_all(worker, plan, store, bundles)
    assert len(worker._backend.calls) == len(plan.chunks)
    for shot in plan.shots:
        for c in shot.chunks:
            qc = replies[c.key].qc
            doc = json.loads(qc["scores"])
            assert sorted(doc["region"]) == sorted(shot.characters)
            assert doc["frames"][0] == c.frame_start and doc["frames"][-1] == c.frame_end - 1
            assert qc["take"] == 1 and qc["qc_flag"] is None and qc["continuity_score"] > 0.9


def _manifest(plan, replies):
    """The manifest as the farm leaves it: each done row updated with its reply's qc fields."""
    rows = plan_rows(plan, "run-qc")
    for row in rows:
        reply = replies[row.content_key]
        row.status = "done"
        for name, value in reply.qc.items():
            setattr(row, name, value)
    return rows_to_table(rows)


def test_flagged_shot_in_report_timeline_and_shot_report(tmp_path):
    # river_020's own policy cannot be met; plain_010 has none (one take, never flagged).
    plan = plan_film(_film(None, shot_qc=QcPolicy(min_identity=1.0, takes=2)))
    store = ChunkStore(str(tmp_path / "out"))
    worker, bundles = _worker(plan, store)
    table = _manifest(plan, _render_all(worker, plan, store, bundles))
    assert table_to_rows(table)[0].scores is not None  # the columns round-trip
    # Per-shot report (what status.json / the CLI would show).
    qc = shot_qc(plan, table)
    assert qc["river_020"].flagged and qc["river_020"].retakes == len(plan.shot("river_020").chunks)
    assert qc["river_020"].report()["qc"] == "flagged"
    assert qc["plain_010"].report() == {"identity": pytest.approx(qc["plain_010"].identity, abs=1e-4),
                                        "retakes": 0, "qc": "ok", "qc_flags": []}
    frames = [f for f, _ in qc["plain_010"].series["buffalo"]]
    assert frames == sorted(set(frames)) and frames[0] == 0 and frames[-1] == plan.shot("plain_010").frames - 1
    # The HTML report: the identity chart, the flag and every take with its reason.
    pngs = charts.write_charts(plan, table, {}, {})
    assert pngs["identity"].startswith(b"\x89PNG")
    media = review.ReportMedia(charts={"identity": review.data_uri(pngs["identity"], "image/png")})
    page = review.render_report(plan, manifest=table, media=media)
    section = page[page.index("<h2>Identity and takes</h2>"):]
    assert 'alt="identity score against time per shot"' in section
    river = section[section.index("<td>river_020</td>"):].split("</tr>")[0]
    assert "flagged: delivered with its best take" in river
    assert river.count("kept take 1 of 2") == len(plan.shot("river_020").chunks)
    assert "take 2: identity" in river and "&lt; `min_identity` 1" in river
    plain = section[section.index("<td>plain_010</td>"):].split("</tr>")[0]
    assert '<span class="ok">ok</span>' in plain and "one take each" in plain
    # The OTIO clip metadata.
    tl = timeline.build_timeline(plan, manifest=table)
    clips = {c.name: c.metadata["reelfarm"]["qc"] for c in tl.tracks[0].find_clips()}
    assert clips["river_020"]["qc"] == "flagged" and clips["plain_010"]["qc"] == "ok"
    assert [c["takes"] for c in clips["river_020"]["chunks"]] == [2] * len(plan.shot("river_020").chunks)
    assert set(clips["plain_010"]["identity_over_time"]) == {"buffalo"}
