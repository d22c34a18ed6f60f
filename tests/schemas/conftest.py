"""Fixtures for spec tests: a tmp folder with two tiny reference PNGs and a spec writer."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image


def write_png(path: Path, color: tuple[int, int, int]) -> Path:
    Image.new("RGB", (8, 8), color).save(path, format="PNG")
    return path


@pytest.fixture
def refs(tmp_path: Path) -> Path:
    """``moth.png`` and ``flame.png`` in ``tmp_path``; returns the folder."""
    write_png(tmp_path / "moth.png", (200, 180, 150))
    write_png(tmp_path / "flame.png", (250, 120, 20))
    return tmp_path


@pytest.fixture
def write_spec(refs: Path) -> Callable[..., Path]:
    """Write dedented text next to the references and return its path."""

    def write(text: str, name: str = "film.yaml") -> Path:
        path = refs / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write
