"""The ``diffusers`` backend family: Wan 2.1, LTX-Video, CogVideoX and SVD image-to-video.

``backend.py`` holds :class:`DiffusersBackend` (one loaded pipeline per worker); one file
per family (``wan.py``, ``ltx.py``, ``cogvideox.py``, ``svd.py``) says what it caches and
how it continues; ``family.py`` the runner protocol they share; ``loading.py`` where weights
come from.
"""

from reelfarm.render.diffusers.backend import RUNNERS, DiffusersBackend, runner_class

__all__ = ["RUNNERS", "DiffusersBackend", "runner_class"]
