"""The memory model: its calibration points, the settings it chooses, plan-time refusal, and
its estimate against the measured peak of a tiny pipeline on CPU.

The CPU check measures peak RSS (VmHWM, reset through /proc/self/clear_refs) while a tiny
SVD pipeline renders a chunk, and compares it with the activations the model predicts from
that pipeline's own sizes and SVD's constants fitted on the H200: within ``FACTOR``.
"""

from __future__ import annotations

import gc
import re
import sys

import pytest
import torch

from reelfarm.errors import PlanError
from reelfarm.flows.plan import plan_film
from reelfarm.render.diffusers import DiffusersBackend
from reelfarm.render.memory import (
    GIB,
    Fit,
    _phases,
    check_plan_fits,
    choose_fit,
    estimate_gib,
    fitted_model,
    largest_fitting,
    profile_from_pipeline,
    shot_peaks,
)
from reelfarm.schemas.film import DiffusersModel, Film

try:
    from tests.render import tiny_pipelines as tp
except ImportError:  # pragma: no cover
    import tiny_pipelines as tp  # type: ignore[no-redef]

FACTOR = 2.0  # estimate / measured activations, either way


def _m(family: str, **kw: object) -> DiffusersModel:
    kw.setdefault("dtype", "float16" if family == "svd" else "bfloat16")
    return DiffusersModel(backend="diffusers", family=family, id="m", **kw)


def test_calibration_points_are_reproduced() -> None:
    assert estimate_gib(_m("ltx"), 768, 512, 121) == pytest.approx(17.8, abs=0.05)
    assert estimate_gib(_m("svd"), 1024, 576, 25) == pytest.approx(64.8, abs=0.05)


def test_fit_chooses_only_settings_that_keep_pixels() -> None:
    wan = _m("wan")
    assert choose_fit(wan, 832, 480, 81, 80).offload == "none"
    assert choose_fit(wan, 832, 480, 81, 48).offload == "model"
    small = choose_fit(wan, 832, 480, 81, 24)
    assert small.offload == "group" and not small.changes_pixels
    # SVD-XT's whole-clip decode on a 24 GiB card: offload cannot shrink a decode, and the
    # farm may not add a decode chunk (it changes pixels), so nothing fits...
    assert choose_fit(_m("svd"), 1024, 576, 25, 24) is None
    # ...unless the spec asks for the chunked decode itself (then it is in the content key).
    own = choose_fit(_m("svd", accel={"decode_chunk": 4}), 1024, 576, 25, 24)
    assert own is not None and own.decode_chunk == 4 and not own.changes_pixels
    hint = choose_fit(_m("svd"), 1024, 576, 25, 24, keep_pixels=False)
    assert hint.pixel_options == ("decode_chunk",) and hint.decode_chunk < 25
    assert estimate_gib(_m("wan", accel={"weights": "fp8"}), 832, 480, 81) < estimate_gib(wan, 832, 480, 81)
    assert largest_fitting(_m("ltx"), 768, 512, 121) == 24
    assert largest_fitting(_m("svd"), 1024, 576, 25) == 80


def test_every_fit_the_farm_may_choose_keeps_the_content_key() -> None:
    """The farm renders a chunk with ``fitted_model(model, fit)``: same key as the spec's."""
    base = _film(832, 480, 81, family="wan")
    keys = [c.key for c in plan_film(base).chunks]
    seen = set()
    for gib in (141, 48, 24, 12):
        fit = choose_fit(base.model, 832, 480, 81, gib)
        if fit is None:
            continue
        seen.add(fit.offload)
        film = base.model_copy(update={"model": fitted_model(base.model, fit)})
        assert [c.key for c in plan_film(film).chunks] == keys, fit
    assert seen == {"none", "model", "group", "sequential"}
    grouped = fitted_model(base.model, Fit(offload="group"))
    assert grouped.accel.group_offload == "block" and grouped.offload == "none"
    # The options that change pixels are the spec's, and they change the key.
    for change in ({"vae_tiling": True}, {"accel": {"decode_chunk": 4}}):
        svd = _film(1024, 576, 25)
        model = DiffusersModel(**{**svd.model.model_dump(), **change})
        other = svd.model_copy(update={"model": model})
        assert plan_film(other).chunks[0].key != plan_film(svd).chunks[0].key, change
    with pytest.raises(ValueError, match="changes pixels|change pixels"):
        fitted_model(base.model, Fit(vae_tiling=True, pixel_options=("vae_tiling",)))


def _film(width: int, height: int, frames: int, family: str = "svd") -> Film:
    dtype = "float16" if family == "svd" else "bfloat16"
    return Film(title="t", resolution=(width, height),
                model={"backend": "diffusers", "family": family, "id": f"org/{family}", "dtype": dtype},
                scenes=[{"id": "s01", "shots": [{"id": "s01_010", "frames": frames, "prompt": "p"}]}])


def test_a_chunk_that_fits_no_gpu_is_refused_at_plan_time() -> None:
    plan = plan_film(_film(1024, 576, 25))
    assert shot_peaks(plan)["s01_010"] == pytest.approx(64.8, abs=0.05)
    check_plan_fits(plan, (80,))
    # On 24 GiB only a chunked decode fits: the message says so, as a spec change.
    with pytest.raises(PlanError, match=r"shot 's01_010': model `org/svd` \(svd\) at 1024x576x25 needs at "
                                        r"least .* GiB with every offload, more than the largest GPU "
                                        r"\(24 GiB\); it fits with `accel.decode_chunk: \d+`"):
        check_plan_fits(plan, (24,))
    huge = plan_film(_film(8192, 8192, 25))
    with pytest.raises(PlanError, match=r"shot 's01_010': model `org/svd` \(svd\) at 8192x8192x25 "
                                        r"needs at least .* GiB with every offload, more than the largest "
                                        r"GPU \(141 GiB\)$"):
        check_plan_fits(huge, (24, 48, 80, 141))


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(field + r":\s+(\d+)", fh.read()).group(1)) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_estimate_matches_measured_peak_of_a_tiny_pipeline_on_cpu() -> None:
    torch.set_num_threads(2)
    model = DiffusersModel(backend="diffusers", family="svd", id="tiny", steps=1, dtype="float32",
                           chunk_frames=tp.TINY_FRAMES["svd"], overlap=1, guidance_scale=3.0)
    be = DiffusersBackend.from_pipeline(tp.build_pipeline("svd"), model)
    size = 96
    shot = tp.tiny_shot(model, chunks=1, size=size)
    ids = {"flame": be.encode_identity("flame", tp.reference_image(48), "0" * 64)}
    be(shot, shot.chunks[0], ids)  # warm: kernels, allocator pools
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _rss("VmRSS")
    be(shot, shot.chunks[0], ids)
    measured = _rss("VmHWM") - before
    mem = profile_from_pipeline(be.pipe, "svd")
    weights = sum(mem.params.values()) * 4
    phases = _phases(mem, dtype="float32", width=size, height=size, frames=model.frames_per_chunk)
    estimated = max(phases.values()) - weights
    print(f"svd {size}px: measured {measured / 2**20:.0f} MiB, estimated {estimated / 2**20:.0f} MiB")
    assert 1 / FACTOR <= estimated / measured <= FACTOR
    assert estimated < GIB


def test_wan_vace_has_a_memory_model_and_a_cost_above_wan():
    from reelfarm.cluster.simulate import FAMILY_COSTS
    from reelfarm.render.identity import identity_doc
    from reelfarm.render.memory import estimate_gib
    from reelfarm.schemas.film import DiffusersModel

    wan = DiffusersModel(backend="diffusers", family="wan", id="org/wan")
    vace = DiffusersModel(backend="diffusers", family="wan_vace", id="org/wan")
    assert estimate_gib(vace, 832, 480, 81) > estimate_gib(wan, 832, 480, 81)
    assert FAMILY_COSTS["wan_vace"].step_s > 0
    assert identity_doc(vace)["composite"] == "over white" and "composite" not in identity_doc(wan)


def test_reelfarm_plan_prints_peaks_and_refuses_what_fits_no_gpu_class_asked_for(tmp_path):
    from typer.testing import CliRunner

    from reelfarm.cli import app
    from tests.films import write_film

    model = {"backend": "diffusers", "family": "svd", "id": "org/svd", "dtype": "float16",
             "chunk_frames": 25, "overlap": 1}
    spec = write_film(tmp_path, shots=[{"id": "s01_010", "frames": 25, "prompt": "p"}],
                      resolution=[1024, 576], model=model)
    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    ok = CliRunner().invoke(app, ["plan", str(spec), "--gpu-memory", "80"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "peak GiB" in ok.output and "64.8" in ok.output
    refused = CliRunner().invoke(app, ["plan", str(spec), "--gpu-memory", "24", "--gpu-memory", "48"], env=env)
    assert refused.exit_code == 2
    assert "more than the largest GPU (48 GiB); it fits with `accel.decode_chunk:" in " ".join(refused.output.split())
