"""Write small film specs (and their reference PNGs) into a folder, for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

# A campaign's base film: `{product}` comes from each matrix cell's vars.
CAMPAIGN_FILM = """\
reelfarm: 1
title: "{product} spot"
characters:
  moth: {reference: moth.png}
scenes:
  - id: s01
    shots:
      - id: s01_010
        frames: 60
        prompt: a moth lands on a {product}
        characters: [moth]
      - id: s01_020
        frames: 48
        prompt: the logo
"""

COLOURS = {"flame": (255, 170, 40), "moth": (150, 130, 200), "owl": (120, 90, 60), "fox": (220, 100, 30)}


def write_reference(path: Path, colour: tuple[int, int, int], size: int = 48) -> Path:
    """A small RGBA figure: a filled circle with two eyes, on transparency."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((4, 4, size - 4, size - 4), fill=(*colour, 255))
    d.ellipse((size // 3 - 4, size // 3, size // 3 + 4, size // 3 + 8), fill=(0, 0, 0, 255))
    d.ellipse((2 * size // 3 - 4, size // 3, 2 * size // 3 + 4, size // 3 + 8), fill=(0, 0, 0, 255))
    im.save(path)
    return path


def write_film(folder: Path, *, shots: list[dict[str, Any]] | None = None,
               characters: tuple[str, ...] = ("flame", "moth"), name: str = "film.yaml",
               **top: Any) -> Path:
    """Write ``folder/name`` with references under ``folder/refs``; returns the spec path.

    Defaults: 64x36 at 24 fps, animatic with 16-frame chunks and 4 frames of overlap,
    two scenes of two shots (about 1-2 s each) so a film has a dozen chunks.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for c in characters:
        write_reference(folder / "refs" / f"{c}.png", COLOURS.get(c, (200, 200, 200)))
    if shots is None:
        shots = [
            {"id": "s01_010", "frames": 40, "prompt": "a flame alone on a shelf", "characters": ["flame"]},
            {"id": "s01_020", "frames": 28, "prompt": "a moth flies in", "characters": ["moth"],
             "camera": {"move": "push_in", "amount": 0.3}},
            {"id": "s02_010", "frames": 34, "prompt": "they meet", "characters": ["flame", "moth"],
             "transition": {"crossfade": 0.25}},
            {"id": "s02_020", "frames": 16, "prompt": "the end", "characters": []},
        ]
    scenes: dict[str, list[dict[str, Any]]] = {}
    for shot in shots:
        scenes.setdefault(shot["id"].split("_")[0], []).append(shot)
    doc = {
        "reelfarm": 1,
        "title": "Test Film",
        "fps": 24,
        "resolution": [64, 36],
        "seed": 7,
        "model": {"backend": "animatic", "chunk_frames": 16, "overlap": 4},
        "characters": {c: {"reference": f"refs/{c}.png"} for c in characters},
        "scenes": [{"id": sid, "shots": s} for sid, s in scenes.items()],
        **top,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def empty_model_folder(folder: Path) -> Path:
    """A model folder that exists (so the spec is valid) but holds no model: the worker's
    load fails, so only the shots that use it fail."""
    path = folder / "empty-model"
    path.mkdir(parents=True, exist_ok=True)
    return path
