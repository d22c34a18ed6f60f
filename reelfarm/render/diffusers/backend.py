"""The diffusers backend: image-to-video chunks from Wan 2.1, LTX-Video, CogVideoX or SVD.

One loaded pipeline per worker. Character identity is encoded once per run into an
:class:`~reelfarm.render.identity.IdentityBundle`; shot conditioning (prompt embeddings, the
start image's encodings) is computed once per shot per worker and memoised; each chunk is
sampled to latents and decoded in a separate step, so an out-of-memory decode is retried
(tiled) without sampling again. One file per family says what it caches and how it continues.

A shot's first chunk, and every chunk when ``continuation == "reference"``, starts from the
shot's keyframe when the worker gives one as ``condition.image`` (composed or pinned,
render/keyframes.py), else from the animatic's keyframe (the characters staged over a backdrop). A later chunk with
``continuation == "previous"`` starts from ``condition.image``, the previous chunk's frame at
this chunk's first frame; LTX can take the previous chunk's latents instead (see ltx.py).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from reelfarm.errors import BackendError, GpuOutOfMemory
from reelfarm.render.base import ChunkOutput, Condition
from reelfarm.render.identity import IdentityBundle, identity_key, reference_rgba

if TYPE_CHECKING:
    from PIL import Image

    from reelfarm.render.checkpoints import CheckpointPolicy, StepCheckpoints
    from reelfarm.render.diffusers.family import FamilyRunner, SampleJob
    from reelfarm.schemas.film import AnimaticModel, DiffusersModel
    from reelfarm.schemas.plan import ChunkPlan, ShotPlan
    from reelfarm.storage import Location

logger = logging.getLogger(__name__)

__all__ = ["RUNNERS", "DiffusersBackend", "runner_class"]

# Plain registry: family -> "module:Class", imported when a model of that family loads.
RUNNERS: dict[str, str] = {
    "wan": "reelfarm.render.diffusers.wan:WanRunner",
    "ltx": "reelfarm.render.diffusers.ltx:LTXRunner",
    "cogvideox": "reelfarm.render.diffusers.cogvideox:CogVideoXRunner",
    "svd": "reelfarm.render.diffusers.svd:SVDRunner",
    "wan_vace": "reelfarm.render.diffusers.wan_vace:WanVACERunner",
}
# What an alpha reference is composited over before a CLIP encoder sees it.
CLIP_BACKGROUND = (255, 255, 255)


def runner_class(family: str) -> type[FamilyRunner]:
    """The runner class of a diffusers family."""
    import importlib

    try:
        module, _, attr = RUNNERS[family].partition(":")
    except KeyError:
        raise BackendError(
            f"unknown diffusers `family` {family!r} (known: {sorted(RUNNERS)})"
        ) from None
    return getattr(importlib.import_module(module), attr)


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}  # fmt: skip


def _rgb(image: np.ndarray, what: str) -> np.ndarray:
    """An ``H x W x 3`` uint8 copy of an ``H x W x 3|4`` uint8 image (alpha over white)."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4) or 0 in img.shape:
        raise BackendError(
            f"{what} must be an H x W x 3|4 uint8 image, got shape {tuple(img.shape)} "
            f"dtype {img.dtype}"
        )
    if img.shape[2] == 3:
        return np.ascontiguousarray(img)
    alpha = img[..., 3:].astype(np.float32) / 255.0
    back = np.array(CLIP_BACKGROUND, np.float32)
    return np.round(img[..., :3] * alpha + back * (1.0 - alpha)).astype(np.uint8)


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (glibc), so a closed model leaves RSS where it was."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or no glibc: nothing to trim
            pass


class DiffusersBackend:
    """Render chunks with a diffusers image-to-video pipeline, identity computed once.

    Args:
        pipe: a loaded pipeline of the family's class (``load`` or ``from_pipeline`` make one).
        model: the spec it was loaded from.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precompute: feed the pipeline memoised conditioning (default). ``False`` calls the
            stock pipeline, which runs its encoders on every call: the reference path for
            equality tests and benchmarks (Wan and SVD then take CLIP from the start image,
            not the characters, and LTX ignores ``condition.latents``).
        offload: the CPU offload in effect (``place_pipeline`` decides it).
    """

    name: ClassVar[str] = "diffusers"

    def __init__(
        self,
        pipe: Any,
        model: DiffusersModel,
        *,
        device: str = "cpu",
        precompute: bool = True,
        offload: str = "none",
    ) -> None:
        self.model = model
        self.device = device
        self.precompute = precompute
        self.offload = offload
        self.vae_tiling = False
        self.accel: dict[str, Any] = {}
        self.fit: Any = None  # the memory settings chosen for the last chunk (render/memory.py)
        self._runner: FamilyRunner | None = runner_class(model.family)(pipe, model, device)
        self._runner.check_pipeline()
        self._runner.decode_chunk = model.accel.decode_chunk
        if model.vae_tiling:
            self.vae_tiling = self._runner.enable_vae_tiling()

    @staticmethod
    def _place(pipe: Any, model: DiffusersModel, device: str) -> tuple[str, dict[str, Any]]:
        """Apply ``model.accel`` (refusing what this worker cannot do), then place ``pipe``."""
        from reelfarm.render.accel import apply_accel, compile_blocks
        from reelfarm.render.diffusers.loading import place_pipeline

        done = apply_accel(pipe, model, device, steps=model.steps or model.rule().default_steps)
        if "group_offload" in done:
            offload = "group"
        else:
            offload = place_pipeline(pipe, model, device, offload=model.offload)
        if compile_blocks(pipe, model):
            done["compile"] = True
        return offload, done

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: AnimaticModel | DiffusersModel,
        *,
        device: str = "cpu",
        precompute: bool = True,
    ) -> DiffusersBackend:
        """Load ``model`` from a hub id, a local folder or an fsspec URL onto ``device``.

        Raises:
            BackendError: not a diffusers model, unreachable, or not of its family.
        """
        from reelfarm.render.diffusers.loading import load_pipeline

        if model.backend != "diffusers":
            raise BackendError(f"the diffusers backend cannot load `backend` {model.backend!r}")
        runner = runner_class(model.family)
        pipe = load_pipeline(model, runner.pipeline_class())
        offload, done = cls._place(pipe, model, device)
        be = cls(pipe, model, device=device, precompute=precompute, offload=offload)
        be.accel = done
        return be

    @classmethod
    def from_pipeline(
        cls, pipe: Any, model: DiffusersModel, *, device: str = "cpu", precompute: bool = True
    ) -> DiffusersBackend:
        """Wrap a pipeline built in memory (benchmarks with random weights), sharing its parts."""
        target = runner_class(model.family).pipeline_class()
        if not isinstance(pipe, target):
            pipe = target.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
        offload, done = cls._place(pipe, model, device)
        be = cls(pipe, model, device=device, precompute=precompute, offload=offload)
        be.accel = done
        return be

    @property
    def pipe(self) -> Any:
        """The loaded pipeline."""
        return self._live().pipe

    def _live(self) -> FamilyRunner:
        if self._runner is None:
            raise BackendError(f"the diffusers backend for `{self.model.id}` is closed")
        return self._runner

    # --- identity --------------------------------------------------------------------
    def encode_identity(self, character: str, reference: np.ndarray, sha256: str) -> IdentityBundle:
        """Encode one character's reference (``H x W x 3|4`` uint8) once per run.

        The bundle holds ``reference_rgba`` (the staging cut-out every backend carries) and,
        for Wan and SVD, the reference's CLIP conditioning (``clip_hidden``/``clip_embeds``).
        """
        import torch
        from PIL import Image


        runner = self._live()
        rgb = _rgb(reference, f"the reference of character {character!r}")
        tensors: dict[str, Any] = {"reference_rgba": torch.from_numpy(reference_rgba(reference))}
        oom = False
        try:
            with torch.inference_mode():
                encoded = runner.encode_reference(Image.fromarray(rgb))
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:
            self._free()
            raise GpuOutOfMemory(f"character {character!r}: out of memory encoding its identity")
        if encoded is not None:
            tensors[str(runner.identity_tensor)] = encoded.detach().to("cpu").clone()
        return IdentityBundle(
            character=character,
            key=identity_key(self.model, sha256),
            tensors=tensors,
            meta={"backend": self.name, "family": self.model.family, "model": self.model.id,
                  "revision": self.model.revision or "", "dtype": self.model.dtype,
                  "sha256": sha256, "combine": runner.identity_combine},
        )  # fmt: skip

    # --- rendering -------------------------------------------------------------------
    def __call__(
        self,
        shot: ShotPlan,
        chunk: ChunkPlan,
        identities: dict[str, IdentityBundle],
        condition: Condition | None = None,
        *,
        checkpoints: StepCheckpoints | None = None,
    ) -> ChunkOutput:
        """Render ``chunk`` of ``shot``: exactly ``chunk.num_frames`` frames.

        Given ``checkpoints`` (see :meth:`step_checkpoints`), the chunk resumes from its last
        usable checkpoint and saves new ones as it samples (render/checkpoints.py).

        Raises:
            BackendError: the chunk, its shot or its inputs do not fit the loaded model.
            GpuOutOfMemory: the device ran out of memory (retry after ``low_memory()``).
        """
        import torch

        runner = self._live()
        t0 = time.perf_counter()
        # 1. Check inputs
        model = self._check(shot, chunk, identities)
        # 2. The start image, and what conditions the sampler
        oom = False
        try:
            with torch.inference_mode():
                job, start = self._job(shot, chunk, identities, condition, model)
                self._prepare_accel(job)
                t1 = time.perf_counter()
                # 3. Sample to latents; the noise comes from a CPU generator seeded per chunk
                latents, generator = self._sample(job, chunk, checkpoints)
                decode_state = generator.get_state()
                t2 = time.perf_counter()
        except torch.cuda.OutOfMemoryError:
            oom = True
        except ValueError as exc:  # the pipeline's own input checks
            raise BackendError(f"chunk {chunk.name!r}: {exc}") from None
        if oom:
            self._free()
            raise GpuOutOfMemory(
                f"chunk {chunk.name!r}: out of memory while sampling on {self.device}"
            )
        # 4. Decode apart from sampling
        frames = self._decode(latents, job, decode_state, chunk)
        t3 = time.perf_counter()
        with torch.inference_mode():
            chunk_latents = runner.chunk_latents(latents, job).detach().to("cpu").clone()
        # 5. Package
        expected = (chunk.num_frames, shot.height, shot.width, 3)
        if frames.shape != expected:
            raise BackendError(
                f"chunk {chunk.name!r}: the pipeline made frames {frames.shape}, "
                f"expected {expected}"
            )
        meta = {
            "backend": self.name, "family": model.family, "model": model.id,
            "revision": model.revision, "dtype": model.dtype, "device": self.device,
            "seed": chunk.seed, "steps": job.steps, "guidance_scale": job.guidance_scale,
            "num_frames": chunk.num_frames, "width": shot.width, "height": shot.height,
            "start": start, "precompute": self.precompute, "offload": self.offload,
            "vae_tiling": self.vae_tiling, "versions": _versions(), "accel": dict(self.accel),
            "fit": None if self.fit is None else vars(self.fit),
            "checkpoints": None if checkpoints is None else checkpoints.summary(),
            # prepare: checks, start image, identity; sample: the encoders the memo did not
            # hold, then the denoising loop; decode: the VAE.
            "stage_s": {"prepare": t1 - t0, "sample": t2 - t1, "decode": t3 - t2},
        }  # fmt: skip
        return ChunkOutput(frames=frames, latents=chunk_latents, meta=meta)

    def _sample(
        self, job: SampleJob, chunk: ChunkPlan, checkpoints: StepCheckpoints | None
    ) -> tuple[Any, Any]:
        """Denoise to latents; returns them and the generator (the decode draws from it)."""
        import torch

        from reelfarm.render.diffusers.resume import CheckpointMismatch, StepHooks

        runner = self._live()
        if checkpoints is None:
            generator = torch.Generator("cpu").manual_seed(chunk.seed)
            return runner.sample(job, generator, precompute=self.precompute), generator
        for resume in (True, False):
            checkpoints.steps_run = 0
            generator = torch.Generator("cpu").manual_seed(chunk.seed)
            hooks = StepHooks(runner.pipe, checkpoints, generator, resume=resume)
            try:
                with hooks:
                    runner.call_hooks = hooks.call_kwargs
                    latents = runner.sample(job, generator, precompute=self.precompute)
            except CheckpointMismatch as err:  # raised before any resumed step ran
                checkpoints.reject(hooks.offset, str(err))
                continue
            finally:
                runner.call_hooks = {}
            checkpoints.resumed_from = hooks.offset
            return latents, generator
        raise AssertionError("unreachable: a render from step 0 never mismatches")

    def step_checkpoints(
        self, store: Location, key: str, shot: ShotPlan, chunk: ChunkPlan, policy: CheckpointPolicy
    ) -> StepCheckpoints | None:
        """The checkpoints of ``chunk`` (stored under ``key``), or None when it has none:
        the policy says none for its cost, or a step cache keeps state between steps that a
        checkpoint does not hold (resume.py)."""
        from reelfarm.render.checkpoints import StepCheckpoints

        model = shot.model
        if model.backend != "diffusers" or model.accel.cache is not None:
            return None
        steps = model.steps or model.rule().default_steps
        return StepCheckpoints(store, key, steps, policy.every_for(steps, chunk.est_gpu_s))

    def _check(
        self, shot: ShotPlan, chunk: ChunkPlan, identities: dict[str, IdentityBundle]
    ) -> DiffusersModel:
        """The shot's model (steps, guidance...) after checking it is the loaded one."""
        model = shot.model
        loaded = self.model
        same = ("family", "id", "revision", "dtype", "accel")
        if model.backend != "diffusers" or any(
            getattr(model, k) != getattr(loaded, k) for k in same
        ):
            want = {k: getattr(loaded, k) for k in same}
            raise BackendError(
                f"shot {shot.shot_id!r} asks for `model` "
                f"{ {k: getattr(model, k, None) for k in ('backend', *same)} }, but this worker "
                f"holds {want}"
            )
        runner = self._live()
        rule = model.rule()
        n = chunk.num_frames
        if not rule.accepts(n) or (n - 1) % runner.temporal_ratio:
            raise BackendError(
                f"chunk {chunk.name!r}: `num_frames` must be {rule.rule} (at least "
                f"{rule.min_frames}, `num_frames - 1` divisible by {runner.temporal_ratio}) "
                f"for {model.family} `{model.id}`, got {n}"
            )
        multiple = max(rule.size_multiple, runner.spatial_multiple)
        if shot.width % multiple or shot.height % multiple:
            raise BackendError(
                f"shot {shot.shot_id!r}: `width` and `height` must be multiples of {multiple} "
                f"for {model.family} `{model.id}`, got {shot.width} x {shot.height}"
            )
        runner.check_size(shot.width, shot.height, n)
        for name in shot.characters:
            bundle = identities.get(name)
            if bundle is None:
                raise BackendError(
                    f"no identity for character {name!r} of shot {shot.shot_id!r} "
                    f"(given: {sorted(identities) or 'none'})"
                )
            want = runner.identity_tensor
            if want and self.precompute and want not in bundle.tensors:
                raise BackendError(
                    f"the identity of character {name!r} has no `{want}`: encode it with this "
                    f"model ({model.family} `{model.id}`), not with {bundle.meta.get('backend')!r}"
                )
            if want and self.precompute and bundle.meta.get("model") != model.id:
                raise BackendError(
                    f"the identity of character {name!r} was encoded by "
                    f"`{bundle.meta.get('model')}`, not by `{model.id}`"
                )
        return model

    def _job(
        self,
        shot: ShotPlan,
        chunk: ChunkPlan,
        identities: dict[str, IdentityBundle],
        condition: Condition | None,
        model: DiffusersModel,
    ) -> tuple[SampleJob, str]:
        from reelfarm.render.diffusers.family import SampleJob, image_key

        runner = self._live()
        start_latent = None
        if chunk.index == 0 or model.continuation == "reference":
            if condition is not None and condition.image is not None:  # the shot's keyframe
                image = _rgb(condition.image, f"the keyframe of shot {shot.shot_id!r}")
                start = "given keyframe"
            else:
                image = self._keyframe(shot, identities, chunk.frame_start)
                start = "keyframe"
        else:
            if condition is None or condition.image is None:
                raise BackendError(
                    f"chunk {chunk.name!r} continues from the previous chunk "
                    "(`continuation` previous) but no `condition.image` was given"
                )
            image = _rgb(condition.image, f"chunk {chunk.name!r}: `condition.image`")
            start = "image"
            if (
                self.precompute
                and runner.accepts_condition_latents
                and condition.latents is not None
            ):
                start_latent = self._start_latent(shot, chunk, condition.latents)
                if start_latent is not None:
                    start = "latents"
        if image.shape[:2] != (shot.height, shot.width):
            image = _resize(image, shot.width, shot.height)
        job = SampleJob(
            prompt=shot.prompt, negative_prompt=model.negative_prompt,
            image=_pil(image), image_key=image_key(image), width=shot.width,
            height=shot.height, num_frames=chunk.num_frames,
            steps=model.steps or model.rule().default_steps,
            guidance_scale=model.guidance_scale, fps=shot.fps,
            identity=self._identity(shot, identities), start_latent=start_latent,
        )  # fmt: skip
        return job, start

    def _keyframe(
        self, shot: ShotPlan, identities: dict[str, IdentityBundle], frame: int
    ) -> np.ndarray:
        try:
            from reelfarm.render.animatic import keyframe
        except ImportError as exc:  # pragma: no cover - the animatic ships with reelfarm
            raise BackendError(f"the animatic keyframe is not available: {exc}") from None
        return _rgb(keyframe(shot, identities, frame), f"the keyframe of shot {shot.shot_id!r}")

    def _start_latent(self, shot: ShotPlan, chunk: ChunkPlan, latents: Any) -> Any:
        """The previous chunk's latent at this chunk's first frame, where the family takes it."""
        if chunk.index < 1 or chunk.index > len(shot.chunks):
            return None
        # The same frame condition.image is (ShotPlan.continuation_frame owns the rule).
        return self._live().start_latent(latents, shot.continuation_frame(chunk))

    def _identity(self, shot: ShotPlan, identities: dict[str, IdentityBundle]) -> Any:
        """The shot's characters' conditioning, combined, on the device (memoised)."""
        runner = self._live()
        name = runner.identity_tensor
        # A reference-to-video family takes the references on its stock path too.
        stock_takes = getattr(runner, "references_in_stock", False)
        if not ((self.precompute or stock_takes) and name and shot.characters):
            return None
        bundles = [identities[c] for c in shot.characters]
        if any(name not in b.tensors for b in bundles):
            return None

        def combine() -> Any:
            tensors = [b.tensors[name].to(runner.execution_device) for b in bundles]
            return tensors[0] if len(tensors) == 1 else runner.combine(tensors)

        return runner.memo.get(("identity", tuple(b.key for b in bundles)), combine)

    def _decode(self, latents: Any, job: SampleJob, state: Any, chunk: ChunkPlan) -> np.ndarray:
        """Decode; on out-of-memory, retry once in low-memory mode (VAE tiling, or the family's
        smaller decode batches), without sampling again."""
        import torch

        runner = self._live()
        for attempt in (1, 2):
            generator = torch.Generator("cpu")
            generator.set_state(state)  # the stock decode draws after sampling
            oom = False
            try:
                with torch.inference_mode():
                    return runner.decode(latents, job, generator)
            except torch.cuda.OutOfMemoryError:
                oom = True
            if oom:
                self._free()
                if attempt == 2:
                    break
                # A second try helps if it changes something: VAE tiling where the VAE has
                # it, or the family's low-memory decode (SVD decodes fewer frames at a time).
                tiled = self.vae_tiling or runner.enable_vae_tiling()
                if not tiled and runner.low_memory:
                    break
                self.vae_tiling = self.vae_tiling or tiled
                runner.low_memory = True
                logger.info(
                    "chunk %s: out of memory decoding; retrying with VAE tiling", chunk.name
                )
        raise GpuOutOfMemory(f"chunk {chunk.name!r}: out of memory while decoding on {self.device}")

    def _prepare_accel(self, job: SampleJob) -> None:
        """Per chunk: the cache hook for this step count, fresh; settings that fit the GPU."""
        from reelfarm.render.accel import denoiser, enable_cache

        runner = self._live()
        cache = self.model.accel.cache
        if cache is not None:
            den = denoiser(runner.pipe)
            if cache.kind == "mag" and getattr(den, "_reelfarm_cache_steps", None) != job.steps:
                enable_cache(runner.pipe, self.model, job.steps)  # its schedule has the steps
            den._reset_stateful_cache()
        if self.device.startswith("cuda"):
            self.fit_to_gpu(job.width, job.height, job.num_frames)

    def fit_to_gpu(self, width: int, height: int, frames: int, gpu_gib: float | None = None) -> Any:
        """Choose, before sampling, the settings under which this chunk fits the GPU
        (render/memory.py), instead of learning from an out-of-memory error. Offload only
        ever escalates; tiling and decode chunk are set for this chunk."""
        from reelfarm.render.memory import GIB, choose_fit

        runner = self._live()
        if gpu_gib is None:
            import torch

            gpu_gib = torch.cuda.get_device_properties(self.device).total_memory / GIB
        fit = choose_fit(self.model, width, height, frames, gpu_gib)
        self.fit = fit
        if fit is None:  # the planner refuses these; render and let an OOM say so
            logger.warning("%s: a %dx%dx%d chunk fits no settings on a %.0f GiB GPU",
                           self.model.id, width, height, frames, gpu_gib)
            return None
        order = ["none", "model", "group", "sequential"]
        if order.index(fit.offload) > order.index(self.offload if self.offload in order else "none"):
            if fit.offload == "model" and self.device.startswith("cuda"):
                runner.pipe.enable_model_cpu_offload(device=self.device)
                self.offload = "model"
            elif fit.offload in ("group", "sequential") and self.device.startswith("cuda"):
                runner.pipe.enable_sequential_cpu_offload(device=self.device)
                self.offload = "sequential"
        if fit.vae_tiling and not self.vae_tiling:
            self.vae_tiling = runner.enable_vae_tiling()
        runner.decode_chunk = fit.decode_chunk
        return fit

    # --- memory ----------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget the memoised shot conditioning (prompt embeddings, image encodings)."""
        self._live().memo.clear()

    def low_memory(self) -> None:
        """Offload to the CPU (on CUDA) and tile the VAE, for an out-of-memory retry."""
        runner = self._live()
        runner.low_memory = True
        runner.memo.clear()
        self.vae_tiling = runner.enable_vae_tiling() or self.vae_tiling
        if self.device.startswith("cuda") and self.offload == "none":
            runner.pipe.enable_model_cpu_offload(device=self.device)
            self.offload = "model"
        self._free()

    def close(self) -> None:
        """Release the pipeline and its device memory. Safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner.memo.clear()
        if self.offload != "none":
            runner.pipe.remove_all_hooks()
        runner.pipe = None
        del runner
        self._free()
        _malloc_trim()

    def _free(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _pil(image: np.ndarray) -> Image.Image:
    from PIL import Image

    return Image.fromarray(image, "RGB")


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))
