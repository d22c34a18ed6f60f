"""The one exception hierarchy of reelfarm.

    FarmError                     base; ``retryable`` says whether trying again may help
    ├── SpecError                 a film or campaign spec is invalid (file, line, field, value)
    ├── PlanError                 a valid spec cannot be planned
    ├── RenderError               one chunk failed to render
    │   ├── BackendError          the model or its inputs are wrong: fail the chunk at once
    │   ├── GpuOutOfMemory        retry with the backend's low-memory settings
    │   ├── WorkerLost            the worker process or its node died: retry elsewhere
    │   └── ChunkTimeout          the chunk ran past a multiple of its estimate: retry
    ├── StoreError                a chunk in storage is missing, partial or corrupt
    │   └── DependencyUnreadable  the chunk a chunk continues from is: render that one again
    └── StitchError               ffmpeg failed or produced a wrong file

Constructors take plain values only, so every error pickles across Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "BackendError",
    "ChunkTimeout",
    "DependencyUnreadable",
    "FarmError",
    "GpuOutOfMemory",
    "Issue",
    "PlanError",
    "RenderError",
    "SpecError",
    "StitchError",
    "StoreError",
    "WorkerLost",
]


class FarmError(Exception):
    """Base of every error reelfarm raises on purpose."""

    retryable: ClassVar[bool] = False


@dataclass(frozen=True)
class Issue:
    """One problem found in a spec: where it is and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(FarmError):
    """A film or campaign spec is invalid. Carries every issue found, in file order."""

    def __init__(self, issues: list[Issue] | tuple[Issue, ...]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    @classmethod
    def single(cls, file: str, message: str, *, line: int | None = None, path: str = "") -> SpecError:
        return cls([Issue(file, line, path, message)])

    def __reduce__(self):  # keep pickling simple for Ray
        return (type(self), (list(self.issues),))


class PlanError(FarmError):
    """A valid spec that cannot be planned (for example a chunk rule that cannot be met)."""


class RenderError(FarmError):
    """One chunk failed to render."""


class BackendError(RenderError):
    """The model, its files or its inputs are wrong. Trying again will not help."""


class GpuOutOfMemory(RenderError):
    """The device ran out of memory. Retry with the backend's low-memory settings."""

    retryable = True


class WorkerLost(RenderError):
    """The worker process or its node died while rendering. Retry on another worker."""

    retryable = True


class ChunkTimeout(RenderError):
    """The chunk ran far past its estimate and was cancelled. Retry."""

    retryable = True


class StoreError(FarmError):
    """A chunk in storage is missing, partial or fails its checksum.

    Args:
        message: what went wrong.
        keys: the content keys of the chunks found missing or corrupt (may be empty when
            the problem is not one chunk's, e.g. a lost connection).
    """

    retryable = True

    def __init__(self, message: str, keys: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.keys = tuple(keys)

    def __reduce__(self):
        return (type(self), (self.message, self.keys))


class DependencyUnreadable(StoreError):
    """The chunk this chunk continues from cannot be read back: it must be rendered again.

    Args:
        message: what went wrong.
        key: the content key of the unreadable dependency.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message, (key,))
        self.key = key

    def __reduce__(self):
        return (type(self), (self.message, self.key))


class StitchError(FarmError):
    """ffmpeg failed, or wrote a file that does not match what was asked.

    Args:
        message: what went wrong.
        argv: the ffmpeg argument list that was run, if any.
        stderr_tail: the last lines ffmpeg wrote to stderr.
    """

    def __init__(self, message: str, argv: list[str] | None = None, stderr_tail: str = "") -> None:
        self.argv = list(argv or [])
        self.stderr_tail = stderr_tail
        text = message
        if self.argv:
            text += "\n  argv: " + " ".join(self.argv)
        if stderr_tail:
            text += "\n  stderr: " + stderr_tail.strip().replace("\n", "\n          ")
        super().__init__(text)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message, self.argv, self.stderr_tail))
