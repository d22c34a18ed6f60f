"""Where a diffusers model comes from and how it lands on a device.

A model id is a local folder, an fsspec URL (copied once into a per-worker model cache,
keyed by URL and revision) or a Hugging Face hub id. The folder's ``model_index.json`` is
checked against the family before any weights load, so an LTX folder named as ``wan`` fails
with a clear :class:`~reelfarm.errors.BackendError` before any chunk starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reelfarm.errors import BackendError

if TYPE_CHECKING:
    from reelfarm.schemas.film import DiffusersModel

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILY_PIPELINES",
    "INTERNALS_TESTED",
    "check_family",
    "load_pipeline",
    "model_cache_dir",
    "place_pipeline",
    "read_model_index",
    "resolve_source",
]

MODEL_CACHE_ENV = "REELFARM_MODEL_CACHE"
_COMPLETE = ".reelfarm-complete.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# The precomputed paths override or mirror pipeline internals (Wan `encode_image` and
# `prepare_latents`, CogVideoX `prepare_latents`, SVD `_encode_image`, LTX's latent packing).
# They were checked bit-identical to the stock call on these versions; the equality tests in
# tests/render/test_diffusers_backend.py guard any other version.
INTERNALS_TESTED = ("0.42.0", "0.43.0")  # diffusers >= first, < second

# family -> (accepted pipeline classes, {component: accepted classes})
FAMILY_PIPELINES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "wan": (
        ("WanImageToVideoPipeline",),
        {"transformer": ("WanTransformer3DModel",), "vae": ("AutoencoderKLWan",)},
    ),
    "ltx": (
        ("LTXImageToVideoPipeline",),
        {"transformer": ("LTXVideoTransformer3DModel",), "vae": ("AutoencoderKLLTXVideo",)},
    ),
    "cogvideox": (
        ("CogVideoXImageToVideoPipeline",),
        {"transformer": ("CogVideoXTransformer3DModel",), "vae": ("AutoencoderKLCogVideoX",)},
    ),
    "wan_vace": (
        ("WanVACEPipeline",),
        {"transformer": ("WanVACETransformer3DModel",), "vae": ("AutoencoderKLWan",)},
    ),
    "svd": (
        ("StableVideoDiffusionPipeline",),
        {"unet": ("UNetSpatioTemporalConditionModel",), "vae": ("AutoencoderKLTemporalDecoder",)},
    ),
}


def _name(model: DiffusersModel) -> str:
    rev = f"@{model.revision}" if model.revision else ""
    return f"model `{model.id}{rev}` (family `{model.family}`)"


def model_cache_dir() -> Path:
    """The per-worker model cache: ``$REELFARM_MODEL_CACHE`` or ``~/.cache/reelfarm/models``."""
    root = os.environ.get(MODEL_CACHE_ENV) or os.path.join("~", ".cache", "reelfarm", "models")
    return Path(root).expanduser()


def _hub_offline() -> bool:
    """Read at call time, so setting ``HF_HUB_OFFLINE`` after import still counts."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return False


def _copy_url(model: DiffusersModel) -> Path:
    """Copy the folder at an fsspec URL into the model cache, once per URL and revision."""
    import fsspec

    key = hashlib.sha256(f"{model.id}\n{model.revision or ''}".encode()).hexdigest()[:32]
    dest = model_cache_dir() / key
    if (dest / _COMPLETE).is_file():
        logger.debug("%s: using cached copy %s", _name(model), dest)
        return dest
    try:
        fs, root = fsspec.core.url_to_fs(model.id)
        if not fs.isdir(root):
            raise BackendError(f"{_name(model)} is not reachable: no folder at `{model.id}`")
        files = [f for f in fs.find(root) if not fs.isdir(f)]
    except BackendError:
        raise
    except Exception as exc:  # any fsspec backend: missing, denied, unknown protocol...
        raise BackendError(
            f"{_name(model)} is not reachable: {type(exc).__name__}: {exc}"
        ) from None
    if not files:
        raise BackendError(f"{_name(model)} is not reachable: `{model.id}` is an empty folder")
    root = root.rstrip("/")
    # 1. Copy into a private folder beside the destination  2. Mark it complete
    # 3. Rename into place: other workers on this machine see a whole copy or nothing.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-{uuid.uuid4().hex[:8]}-", dir=dest.parent))
    try:
        for remote in files:
            rel = posixpath.relpath(remote, root)
            if rel.startswith(".."):
                raise BackendError(f"{_name(model)}: file `{remote}` lies outside `{model.id}`")
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        marker = {"url": model.id, "revision": model.revision, "files": len(files)}
        (tmp / _COMPLETE).write_text(json.dumps(marker))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _COMPLETE).is_file():  # a partial folder from a crashed worker
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"{_name(model)}: copy into the model cache failed: {exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s: copied %d files into %s", _name(model), len(files), dest)
    return dest


def resolve_source(model: DiffusersModel) -> str:
    """A local folder (fsspec URLs are copied into the model cache) or a hub id.

    Raises:
        BackendError: the id is neither an existing folder, a reachable URL nor a hub id.
    """
    ident = model.id
    if "://" in ident and not ident.startswith("file://"):
        return str(_copy_url(model))
    if ident.startswith("file://"):
        local = ident[len("file://") :]
        if os.path.isdir(local):
            return local
        raise BackendError(f"{_name(model)} is not reachable: no folder at `{ident}`")
    path = os.path.expanduser(ident)
    if os.path.isdir(path):
        return path
    if _HUB_ID.match(ident) and not ident.startswith((".", "/", "~")):
        return ident
    raise BackendError(
        f"{_name(model)} is neither a local folder, an fsspec URL nor a hub id "
        f"(`owner/name`): no folder at `{path}`"
    )


def read_model_index(source: str, model: DiffusersModel) -> dict[str, Any]:
    """``model_index.json`` of a local folder, or fetched alone from the hub."""
    if os.path.isdir(source):
        index = Path(source) / "model_index.json"
        if not index.is_file():
            raise BackendError(
                f"{_name(model)}: `{source}` is not a diffusers pipeline folder "
                "(no model_index.json)"
            )
        path = str(index)
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                source, "model_index.json", revision=model.revision,
                local_files_only=_hub_offline(),
            )  # fmt: skip
        except Exception as exc:
            raise BackendError(
                f"{_name(model)} is not a local folder and is not reachable on the hub: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise BackendError(f"{_name(model)}: unreadable model_index.json: {exc}") from None


def check_family(index: dict[str, Any], model: DiffusersModel) -> None:
    """Refuse a pipeline folder whose classes do not belong to the model's family."""
    pipelines, components = FAMILY_PIPELINES[model.family]
    found = index.get("_class_name")
    if found not in pipelines:
        others = [f for f, (names, _) in FAMILY_PIPELINES.items() if found in names]
        hint = f"; it looks like a `{others[0]}` model" if others else ""
        raise BackendError(
            f"{_name(model)}: the folder holds a `{found}`, not a {' or '.join(pipelines)}{hint}"
        )
    for component, classes in components.items():
        entry = index.get(component)
        name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if name not in classes:
            raise BackendError(
                f"{_name(model)}: component `{component}` is `{name}`, expected "
                f"{' or '.join(classes)}"
            )


def _check_version() -> None:
    import diffusers

    low, high = INTERNALS_TESTED
    if not (_version_tuple(low) <= _version_tuple(diffusers.__version__) < _version_tuple(high)):
        logger.warning(
            "diffusers %s is outside the range the precomputed paths were checked on "
            "(>=%s,<%s); run tests/render/test_diffusers_backend.py before trusting them",
            diffusers.__version__, low, high,
        )  # fmt: skip


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _dtypes(model: DiffusersModel) -> Any:
    import torch

    dtype = getattr(torch, model.dtype)
    if model.family in ("wan", "wan_vace") and dtype != torch.float32:
        # As Wan's model cards do: the VAE and the CLIP image encoder stay in float32.
        return {"default": dtype, "vae": torch.float32, "image_encoder": torch.float32}
    return dtype


def load_pipeline(model: DiffusersModel, pipeline_cls: type) -> Any:
    """Load ``model`` with ``pipeline_cls.from_pretrained``, after checking its family.

    Raises:
        BackendError: unreachable model, wrong family, or files ``from_pretrained`` refuses.
    """
    _check_version()
    source = resolve_source(model)
    index = read_model_index(source, model)
    check_family(index, model)
    kwargs: dict[str, Any] = {"dtype": _dtypes(model)}
    if not os.path.isdir(source):
        kwargs.update(revision=model.revision, local_files_only=_hub_offline())
    try:
        with warnings.catch_warnings():
            # huggingface_hub warns about an argument diffusers still passes when downloading.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            pipe = pipeline_cls.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise BackendError(
            f"{_name(model)}: from_pretrained failed: {type(exc).__name__}: {exc}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place_pipeline(pipe: Any, model: DiffusersModel, device: str, *, offload: str) -> str:
    """Move ``pipe`` to ``device`` or set up CPU offload; returns the offload in effect.

    Offload only means something on CUDA: on any other device it is ignored (debug log).
    """
    on_cuda = device.startswith("cuda")
    if offload != "none" and not on_cuda:
        logger.debug("%s: offload `%s` ignored on device %s", _name(model), offload, device)
        offload = "none"
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return offload
