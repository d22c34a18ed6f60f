"""The animatic backend: a deterministic pre-visualisation drawn from the references alone.

No weights and no GPU. Each shot gets a backdrop derived from its prompt, its characters'
reference cut-outs staged across the frame, a gentle idle motion per character, the
shot's camera move done with ``torch`` warps, and an optional burnt-in slate.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from reelfarm.errors import BackendError
from reelfarm.render.base import ChunkOutput, Condition
from reelfarm.render.identity import IdentityBundle, feathered_ellipse, identity_key, reference_rgba

# ANIMATIC_VERSION (bump when the drawing changes) lives with the family rules: it is part
# of every animatic chunk key and identity key, so cached frames of an older drawing are
# never mixed with new ones.
from reelfarm.schemas.families import ANIMATIC_VERSION

if TYPE_CHECKING:
    from reelfarm.schemas.film import AnimaticModel, DiffusersModel
    from reelfarm.schemas.plan import ChunkPlan, ShotPlan

logger = logging.getLogger(__name__)

__all__ = ["ANIMATIC_VERSION", "AnimaticBackend", "character_coverage", "keyframe"]

# Staging, as fractions of the frame height (H) or width (W).
_HORIZON = 0.62  # horizon line, H
_FEET = 0.9  # front-row feet line, H
_FEET_BACK = 0.8  # back-row feet line when three or more characters share a shot, H
_FIGURE = 0.46  # front-row figure height, H
_FOCUS = 0.62  # push-ins and pull-outs keep this line still (the characters' chests), H
# Idle motion: a small hop with squash and stretch, a sway, and a lean.
_HOP = 0.012  # H
_SWAY = 0.006  # W
_LEAN = 0.035  # horizontal shear: top of the figure moves by this x its height
_SUB_BATCH = 4  # frames warped per grid_sample call: bounds memory at any chunk length
_STAGE_CACHE = 4  # shots whose static layers stay memoised


# --- backdrop ---------------------------------------------------------------------------
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _palette(prompt: str) -> dict[str, np.ndarray]:
    """Colours from the prompt: its mood words pick the light, its hash picks the hues."""
    digest = hashlib.sha256(prompt.encode()).digest()
    hue = 0.06 + 0.38 * digest[0] / 256.0  # ground hues from earth brown to sea green
    tint = (digest[1] / 256.0 - 0.5) * 0.12
    words = prompt.lower()
    if any(w in words for w in ("night", "dark", "moon", "star", "candle", "midnight")):
        mood = "night"
    elif any(w in words for w in ("sunset", "dusk", "dawn", "sunrise", "evening", "golden")):
        mood = "dusk"
    else:
        mood = "day"
    if mood == "night":
        pal = {
            "sky_top": _hsv(0.64 + tint, 0.65, 0.10),
            "sky_low": _hsv(0.68 + tint, 0.45, 0.30),
            "far": _hsv(0.66 + tint, 0.35, 0.20),
            "near": _hsv(hue, 0.30, 0.15),
            "ground_far": _hsv(hue, 0.30, 0.20),
            "ground_near": _hsv(hue, 0.35, 0.09),
            "light": _hsv(0.14, 0.15, 0.95),
            "cloud": _hsv(0.66 + tint, 0.20, 0.45),
        }
    elif mood == "dusk":
        pal = {
            "sky_top": _hsv(0.70 + tint, 0.50, 0.35),
            "sky_low": _hsv(0.07 + tint, 0.60, 0.95),
            "far": _hsv(0.80 + tint, 0.35, 0.45),
            "near": _hsv(hue, 0.40, 0.30),
            "ground_far": _hsv(hue, 0.45, 0.40),
            "ground_near": _hsv(hue, 0.50, 0.20),
            "light": _hsv(0.10, 0.55, 1.00),
            "cloud": _hsv(0.95 + tint, 0.30, 0.90),
        }
    else:
        pal = {
            "sky_top": _hsv(0.58 + tint, 0.55, 0.80),
            "sky_low": _hsv(0.55 + tint, 0.20, 0.97),
            "far": _hsv(0.55 + tint, 0.25, 0.70),
            "near": _hsv(hue, 0.45, 0.55),
            "ground_far": _hsv(hue, 0.45, 0.65),
            "ground_near": _hsv(hue, 0.55, 0.40),
            "light": _hsv(0.13, 0.20, 1.00),
            "cloud": _hsv(0.0, 0.0, 1.00),
        }
    return pal


def _blend_into(img: np.ndarray, alpha: np.ndarray, color: np.ndarray, y0: int, x0: int) -> None:
    """Blend ``color`` into ``img[y0:, x0:]`` with ``alpha`` (h x w, 0..1), in place."""
    h, w = alpha.shape
    region = img[y0 : y0 + h, x0 : x0 + w]
    a = alpha[..., None].astype(np.float32)
    region *= 1.0 - a
    region += a * color


def _soft_ellipse(
    img: np.ndarray, cx: float, cy: float, rx: float, ry: float, color: np.ndarray, alpha: float
) -> None:
    """A soft ellipse (quadratic falloff), wrapped around the texture's periodic width."""
    th, tw = img.shape[:2]
    y0, y1 = max(0, math.floor(cy - ry)), min(th, math.ceil(cy + ry) + 1)
    if y0 >= y1:
        return
    ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) - cy) / ry
    for shift in (-tw, 0, tw):
        x0, x1 = max(0, math.floor(cx + shift - rx)), min(tw, math.ceil(cx + shift + rx) + 1)
        if x0 >= x1:
            continue
        xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5) - (cx + shift)) / rx
        q = np.clip(1.0 - (ys[:, None] ** 2 + xs[None, :] ** 2), 0.0, 1.0)
        _blend_into(img, q * q * alpha, color, y0, x0)


def _ridge(tw: int, rng: np.random.Generator, base: float, amp: float) -> np.ndarray:
    """A hill line per texture column: a few sines whose periods divide the texture width."""
    terms = [(int(k), rng.uniform(0, 2 * math.pi), w) for k, w in ((2, 1.0), (5, 0.45), (11, 0.2))]
    terms = [(k + int(rng.integers(0, 2)), p, w) for k, p, w in terms]
    norm = sum(w for _, _, w in terms)
    # math.sin per column (not numpy's vectorised sin): the same digits on every CPU.
    heights = [
        sum(w * math.sin(2 * math.pi * k * x / tw + p) for k, p, w in terms) / norm
        for x in range(tw)
    ]
    return base - amp * np.array(heights, dtype=np.float32)


def _fill_below(img: np.ndarray, ridge: np.ndarray, color: np.ndarray) -> None:
    """Fill everything below a per-column line, anti-aliased over one pixel."""
    y0 = max(0, math.floor(float(ridge.min())) - 1)
    ys = np.arange(y0, img.shape[0], dtype=np.float32) + 0.5
    alpha = np.clip(ys[:, None] - ridge[None, :] + 0.5, 0.0, 1.0)
    _blend_into(img, alpha, color, y0, 0)


def _draw_backdrop(prompt: str, seed: int, tw: int, th: int, height: int) -> np.ndarray:
    """The backdrop texture, ``th x tw x 3`` float32 in 0..255, periodic across its width.

    The texture covers world rows ``-H/2 .. 3H/2`` (so tilts and pull-outs find sky and
    ground) and two frame widths, wrapped (so pans may continue for ever).
    """
    pal = _palette(prompt)
    rng = np.random.default_rng(
        int.from_bytes(hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()[:8], "little")
    )
    ky = th / (2.0 * height)

    def row(world_y: float) -> float:
        return (world_y + height / 2.0) * ky

    horizon = row(_HORIZON * height)
    img = np.empty((th, tw, 3), np.float32)
    # 1. Sky: a gradient down to the horizon.
    t = np.clip((np.arange(th, dtype=np.float32) + 0.5) / horizon, 0.0, 1.0)[:, None, None]
    t = t * t
    img[:] = pal["sky_top"] * (1.0 - t) + pal["sky_low"] * t
    # 2. Stars or dust: specks that make pans and tilts easy to read.
    count = int(tw * th / 4000)
    sy = rng.integers(0, max(1, int(horizon)), count)
    sx = rng.integers(0, tw, count)
    glow = rng.uniform(0.25, 0.8, count).astype(np.float32)[:, None]
    img[sy, sx] = img[sy, sx] * (1.0 - glow) + pal["light"] * glow
    # 3. A light in the sky (moon or sun) with its glow, and a few clouds.
    lx, ly, lr = rng.uniform(0, tw), row(rng.uniform(0.12, 0.3) * height), 0.055 * th / 2
    _soft_ellipse(img, lx, ly, lr * 5, lr * 5, pal["light"], 0.22)
    _soft_ellipse(img, lx, ly, lr * 1.6, lr * 1.6, pal["light"], 0.5)
    _soft_ellipse(img, lx, ly, lr, lr, pal["light"], 1.0)
    for _ in range(5):
        cx, cy = rng.uniform(0, tw), row(rng.uniform(-0.3, 0.45) * height)
        rx = rng.uniform(0.06, 0.14) * tw
        _soft_ellipse(img, cx, cy, rx, rx * rng.uniform(0.12, 0.22), pal["cloud"], 0.35)
    # 4. Two ranges of hills, far and near.
    _fill_below(img, _ridge(tw, rng, horizon - 0.10 * th / 2, 0.07 * th / 2), pal["far"])
    _fill_below(img, _ridge(tw, rng, horizon - 0.03 * th / 2, 0.04 * th / 2), pal["near"])
    # 5. Ground: a gradient from the horizon down, with soft patches for texture.
    gy0 = math.floor(horizon)
    t = np.clip((np.arange(gy0, th, dtype=np.float32) + 0.5 - horizon) / (th - horizon), 0, 1)
    ground = pal["ground_far"] * (1.0 - t[:, None]) + pal["ground_near"] * t[:, None]
    edge = np.clip(np.arange(gy0, th, dtype=np.float32) + 0.5 - horizon + 0.5, 0.0, 1.0)
    _blend_into(img, np.repeat(edge[:, None], tw, axis=1), np.float32(0), gy0, 0)
    img[gy0:] += ground[:, None, :] * edge[:, None, None]
    for _ in range(14):
        depth = rng.uniform(0.0, 1.0)
        cy = horizon + (th - horizon) * (0.05 + 0.9 * depth)
        rx = (0.03 + 0.08 * depth) * tw
        shade = pal["ground_near"] * 0.6 if rng.uniform() < 0.6 else pal["ground_far"] * 1.25
        _soft_ellipse(img, rng.uniform(0, tw), cy, rx, rx * 0.12, shade, 0.45)
    return np.clip(img, 0.0, 255.0)


# --- staging ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sprite:
    """One character's cut-out, placed in world coordinates (frame 0 of a static camera)."""

    texture: torch.Tensor  # 1 x 4 x h x w float32: premultiplied colour + 0.5, then alpha
    anchor_u: float  # the feet's position in texture pixels (edge coordinates)
    anchor_v: float
    rho: float  # world pixels per texture pixel
    x: float  # the feet's position in the world
    y: float
    phase: float  # idle-motion phase, from the character's name
    period: float  # seconds per hop


@dataclass(frozen=True)
class _Stage:
    """A shot's static layers: the backdrop texture and the staged sprites, draw order."""

    texture: torch.Tensor  # 1 x 3 x th x (tw + 2) float32, colour + 0.5, wrap columns added
    tw: int
    th: int
    sprites: tuple[_Sprite, ...]


def _name_phase(name: str) -> tuple[float, float]:
    digest = hashlib.sha256(name.encode()).digest()
    return digest[0] / 256.0 * 2 * math.pi, 1.2 + 0.6 * digest[1] / 256.0


def _max_zoom(shot: ShotPlan) -> float:
    """The largest zoom the camera reaches within the shot (sprites are drawn that sharp)."""
    move, amount = shot.camera.move, shot.camera.amount
    if move in ("push_in", "pull_out"):
        return 1.0 + amount
    if move == "orbit":
        return 1.0 + 0.15 * amount
    return 1.0


def _make_sprite(
    rgba: np.ndarray, x: float, y: float, height: float, max_width: float, zoom: float,
    name: str,
) -> _Sprite | None:
    """Cut a reference to its figure, size it for the frame and add a soft ground shadow."""
    if rgba[..., 3].min() == 255:  # a bundle from a backend that kept the photo opaque
        rgba = rgba.copy()
        rgba[..., 3] = np.round(feathered_ellipse(*rgba.shape[:2]) * 255.0).astype(np.uint8)
    # 1. Crop to the figure so its lowest opaque pixel stands on the feet line.
    rows = np.flatnonzero(rgba[..., 3].max(axis=1) > 8)
    cols = np.flatnonzero(rgba[..., 3].max(axis=0) > 8)
    if rows.size == 0:
        return None
    rgba = rgba[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = rgba.shape[:2]
    # 2. Size: the figure height, narrowed to its slot, drawn sharp enough for the zoom.
    world_h = min(height, max_width * h / w)
    ph = max(2, round(world_h * zoom))
    pw = max(2, round(ph * w / h))
    rho = world_h / ph
    image = Image.fromarray(np.ascontiguousarray(rgba), "RGBA").convert("RGBa")
    fig = np.asarray(image.resize((pw, ph), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    # 3. Canvas with a one-pixel clear border, the shadow centred under the feet.
    shadow_w, shadow_h = pw * 0.9, max(2.0, pw * 0.12)
    cw = max(pw, math.ceil(shadow_w)) + 2
    ch = ph + math.ceil(shadow_h / 2) + 2
    au, av = cw / 2.0, ph + 1.0
    canvas = np.zeros((ch, cw, 4), np.float32)
    ys = (np.arange(ch, dtype=np.float32) + 0.5 - av) / (shadow_h / 2)
    xs = (np.arange(cw, dtype=np.float32) + 0.5 - au) / (shadow_w / 2)
    q = np.clip(1.0 - (ys[:, None] ** 2 + xs[None, :] ** 2), 0.0, 1.0)
    canvas[..., 3] = q * q * 0.45  # black shadow: premultiplied colour stays 0
    fx = (cw - pw) // 2
    under = 1.0 - fig[..., 3:4]
    canvas[1 : 1 + ph, fx : fx + pw] = fig + canvas[1 : 1 + ph, fx : fx + pw] * under
    au = fx + pw / 2.0
    # 4. Colour in 0..255 plus 0.5 x alpha: the final uint8 cast then rounds (see _render).
    texture = np.empty_like(canvas)
    texture[..., :3] = canvas[..., :3] * 255.0 + canvas[..., 3:4] * 0.5
    texture[..., 3] = canvas[..., 3]
    phase, period = _name_phase(name)
    return _Sprite(
        texture=torch.from_numpy(texture).permute(2, 0, 1)[None].contiguous(),
        anchor_u=au, anchor_v=av, rho=rho, x=x, y=y, phase=phase, period=period,
    )


def _build_stage(shot: ShotPlan, identities: dict[str, IdentityBundle]) -> _Stage:
    W, H = shot.width, shot.height
    # Big frames get a half-resolution backdrop: it is soft, and memory stays bounded.
    scale = min(1.0, math.sqrt(1280 * 720 / (W * H)))
    tw, th = max(8, round(2 * W * scale)), max(8, round(2 * H * scale))
    backdrop = _draw_backdrop(shot.prompt, shot.seed, tw, th, H)
    # Wrap columns on both sides, so bilinear sampling across the seam stays seamless.
    padded = np.concatenate([backdrop[:, -1:], backdrop, backdrop[:, :1]], axis=1) + 0.5
    texture = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].contiguous()

    names = shot.characters
    k = len(names)
    zoom = _max_zoom(shot)
    placed: list[tuple[int, _Sprite]] = []
    for i, name in enumerate(names):
        back = k >= 3 and i % 2 == 1
        depth = 0.82 if back else 1.0
        rgba = _as_array(identities[name].tensors["reference_rgba"])
        sprite = _make_sprite(
            rgba,
            x=W * (i + 1) / (k + 1),
            y=H * (_FEET_BACK if back else _FEET),
            height=H * _FIGURE * depth,
            max_width=0.9 * W / (k + 0.5) * depth,
            zoom=zoom,
            name=name,
        )
        if sprite is not None:
            placed.append((0 if back else 1, sprite))
    # Back row first; within a row, left to right.
    sprites = tuple(s for _, s in sorted(placed, key=lambda p: (p[0], p[1].x)))
    return _Stage(texture=texture, tw=tw, th=th, sprites=sprites)


_STAGES: OrderedDict[tuple, _Stage] = OrderedDict()
_STAGES_LOCK = threading.Lock()


def _stage(shot: ShotPlan, identities: dict[str, IdentityBundle]) -> _Stage:
    """The shot's static layers, memoised per shot (a chunk of the same shot reuses them)."""
    key = (
        shot.width, shot.height, shot.prompt, shot.seed, shot.camera.move, shot.camera.amount,
        tuple((name, identities[name].key) for name in shot.characters),
    )
    with _STAGES_LOCK:
        if key in _STAGES:
            _STAGES.move_to_end(key)
            return _STAGES[key]
    stage = _build_stage(shot, identities)
    with _STAGES_LOCK:
        _STAGES[key] = stage
        while len(_STAGES) > _STAGE_CACHE:
            _STAGES.popitem(last=False)
    return stage


# --- camera and motion ------------------------------------------------------------------
def _cameras(shot: ShotPlan, frame: int) -> tuple[tuple[float, float, float], ...]:
    """``(zoom, centre x, centre y)`` in world pixels for the backdrop and the characters.

    Progress ``u`` is 0 on the first frame and 1 on the last; frames past the end keep
    going at the same rate, so an overlong last chunk still shows the move continuing.
    """
    W, H = shot.width, shot.height
    u = frame / max(shot.frames - 1, 1)
    move, k = shot.camera.move, shot.camera.amount
    zoom, cx, cy = 1.0, W / 2.0, H / 2.0
    fg_cx = cx
    if move == "pan_left":
        cx = fg_cx = cx - 0.5 * W * k * u
    elif move == "pan_right":
        cx = fg_cx = cx + 0.5 * W * k * u
    elif move == "tilt_up":
        cy -= 0.5 * H * k * u
    elif move == "tilt_down":
        cy += 0.5 * H * k * u
    elif move in ("push_in", "pull_out", "orbit"):
        if move == "push_in":
            zoom = (1.0 + k) ** u
        elif move == "pull_out":
            zoom = (1.0 + k) ** (1.0 - u)
        else:
            zoom = (1.0 + 0.15 * k) ** u
        # Keep the characters' chest line still on screen while zooming.
        focus = _FOCUS * H
        cy = focus + (H / 2.0 - focus) / zoom
        if move == "orbit":
            # Parallax: circling the characters, the far backdrop slides one way fast
            # while the characters drift a little the other way.
            cx -= 0.5 * W * k * u
            fg_cx = W / 2.0 + 0.08 * W * k * u
        else:
            fg_cx = cx
    return (zoom, cx, cy), (zoom, fg_cx, cy)


def _pose(sprite: _Sprite, frame: int, fps: Fraction, W: int, H: int) -> tuple[float, ...]:
    """Idle motion at a frame: feet position, squash/stretch and lean."""
    t = float(Fraction(frame) / fps)
    hop = 2 * math.pi * t / sprite.period + sprite.phase
    sway = 2 * math.pi * t / (sprite.period * 1.7) + sprite.phase * 1.3
    ax = sprite.x + _SWAY * W * math.sin(sway)
    ay = sprite.y - _HOP * H * (0.5 + 0.5 * math.sin(hop))
    sy = 1.0 + 0.025 * math.cos(hop)
    sx = 1.0 - 0.0125 * math.cos(hop)
    lean = _LEAN * math.sin(sway + 0.7)
    return ax, ay, sx, sy, lean


# --- drawing a chunk --------------------------------------------------------------------
def _backdrop_grid(stage: _Stage, cams: list[tuple[float, float, float]], W: int, H: int):
    """The sampling grid of the backdrop for each camera: ``N x H x W x 2``.

    Built per frame from that frame's camera only, column and row vectors in float64, so
    a frame's grid is the same whichever chunk it is drawn in.
    """
    xp = np.arange(W, dtype=np.float64) + 0.5 - W / 2.0
    yp = np.arange(H, dtype=np.float64) + 0.5 - H / 2.0
    kx, ky = stage.tw / (2.0 * W), stage.th / (2.0 * H)
    gx = np.empty((len(cams), W), np.float64)
    gy = np.empty((len(cams), H), np.float64)
    for n, (zoom, cx, cy) in enumerate(cams):
        world_x = np.mod(cx + xp / zoom + W / 2.0, 2.0 * W)  # periodic: pans never run out
        gx[n] = 2.0 * (world_x * kx + 1.0) / (stage.tw + 2) - 1.0
        gy[n] = 2.0 * ((cy + yp / zoom + H / 2.0) * ky) / stage.th - 1.0
    grid = torch.empty((len(cams), H, W, 2), dtype=torch.float32)
    grid[..., 0] = torch.from_numpy(gx.astype(np.float32))[:, None, :]
    grid[..., 1] = torch.from_numpy(gy.astype(np.float32))[:, :, None]
    return grid


def _draw_sprite(
    out: torch.Tensor, sprite: _Sprite, frames: list[int], cams: list[tuple[float, float, float]],
    fps: Fraction,
) -> None:
    """Warp one sprite into each frame of ``out`` (N x 3 x H x W) and blend it, in place.

    The sprite is sampled only inside a box around it. Every coefficient comes from the
    frame's own camera and pose, and pixels outside the sprite blend as exact no-ops, so
    the box size (which depends on the chunk) never changes a pixel.
    """
    N, _, H, W = out.shape
    ch, cw = sprite.texture.shape[2:]
    coef = np.empty((N, 5), np.float64)
    boxes: list[tuple[int, int, int, int] | None] = []
    for n, (frame, (zoom, cx, cy)) in enumerate(zip(frames, cams, strict=True)):
        ax, ay, sx, sy, lean = _pose(sprite, frame, fps, W, H)
        # Texture coords from screen offsets Xp, Yp (pixel centres minus frame centre):
        #   u = A Xp + B Yp + C,  v = D Yp + E   (normalised to -1..1 for grid_sample)
        rx, ry = sprite.rho * sx, sprite.rho * sy
        a = 1.0 / (zoom * rx)
        b = lean / (zoom * rx)
        c = sprite.anchor_u + (cx - ax - lean * ay + lean * cy) / rx
        d = 1.0 / (zoom * ry)
        e = sprite.anchor_v + (cy - ay) / ry
        coef[n] = (2 * a / cw, 2 * b / cw, 2 * c / cw - 1, 2 * d / ch, 2 * e / ch - 1)
        # Screen box: the texture's corners, forwards through pose and camera.
        xs, ys = [], []
        for u, v in ((0, 0), (cw, 0), (0, ch), (cw, ch)):
            wy = ay + (v - sprite.anchor_v) * ry
            wx = ax + lean * (ay - wy) + (u - sprite.anchor_u) * rx
            xs.append((wx - cx) * zoom + W / 2.0)
            ys.append((wy - cy) * zoom + H / 2.0)
        x0, x1 = max(0, math.floor(min(xs)) - 1), min(W, math.ceil(max(xs)) + 1)
        y0, y1 = max(0, math.floor(min(ys)) - 1), min(H, math.ceil(max(ys)) + 1)
        boxes.append((x0, x1, y0, y1) if x0 < x1 and y0 < y1 else None)
    shown = [box for box in boxes if box is not None]
    if not shown:
        return
    bw = max(x1 - x0 for x0, x1, _, _ in shown)
    bh = max(y1 - y0 for _, _, y0, y1 in shown)
    origins = np.array(
        [(min(box[0], W - bw), min(box[2], H - bh)) if box else (0, 0) for box in boxes],
        dtype=np.float64,
    )
    xp = origins[:, 0:1] + np.arange(bw, dtype=np.float64)[None, :] + 0.5 - W / 2.0
    yp = origins[:, 1:2] + np.arange(bh, dtype=np.float64)[None, :] + 0.5 - H / 2.0
    cf = torch.from_numpy(coef.astype(np.float32))
    xt = torch.from_numpy(xp.astype(np.float32))[:, None, :]
    yt = torch.from_numpy(yp.astype(np.float32))[:, :, None]
    grid = torch.empty((N, bh, bw, 2), dtype=torch.float32)
    # Separate multiplies and adds (no fused ops): identical results in any batch layout.
    grid[..., 0] = xt * cf[:, 0, None, None] + (yt * cf[:, 1, None, None] + cf[:, 2, None, None])
    grid[..., 1] = yt * cf[:, 3, None, None] + cf[:, 4, None, None]
    texture = sprite.texture.expand(N, -1, -1, -1)
    sampled = F.grid_sample(
        texture, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    for n, box in enumerate(boxes):
        if box is None:
            continue
        ox, oy = int(origins[n, 0]), int(origins[n, 1])
        region = out[n, :, oy : oy + bh, ox : ox + bw]
        region.mul_(1.0 - sampled[n, 3:4]).add_(sampled[n, :3])


def character_coverage(
    shot: ShotPlan, identities: dict[str, IdentityBundle], frames: list[int]
) -> list[tuple[str, torch.Tensor]]:
    """Where each character's sprite stands: per character, ``len(frames) x H x W`` coverage
    in 0..1, in draw order (back row first, then left to right, so later ones hide earlier
    ones). The sprite's alpha is warped exactly as its colour is; scores use it to find a
    character's region in a frame (render/scores.py)."""
    stage = _stage(shot, identities)
    W, H = shot.width, shot.height
    k = len(shot.characters)
    by_x = {W * (i + 1) / (k + 1): name for i, name in enumerate(shot.characters)}  # _build_stage
    cams = [_cameras(shot, f)[1] for f in frames]
    covers: list[tuple[str, torch.Tensor]] = []
    for sprite in stage.sprites:
        alpha = sprite.texture[:, 3:4]
        mask = replace(sprite, texture=torch.cat([alpha, alpha, alpha, alpha], dim=1))
        out = torch.zeros((len(frames), 3, H, W), dtype=torch.float32)
        _draw_sprite(out, mask, frames, cams, shot.fps)
        covers.append((by_x[sprite.x], out[:, 0]))
    return covers


def _draw_frames(shot: ShotPlan, stage: _Stage, frames: list[int]) -> torch.Tensor:
    """Frames ``N x 3 x H x W`` float32 holding colour + 0.5, so a uint8 cast rounds."""
    W, H = shot.width, shot.height
    cams = [_cameras(shot, f) for f in frames]
    # 1. Backdrop: one grid_sample for the distinct cameras (a static shot warps once).
    bg_cams = [c[0] for c in cams]
    unique = list(dict.fromkeys(bg_cams))
    grid = _backdrop_grid(stage, unique, W, H)
    texture = stage.texture.expand(len(unique), -1, -1, -1)
    warped = F.grid_sample(
        texture, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    index = torch.tensor([unique.index(c) for c in bg_cams])
    out = warped.index_select(0, index) if len(unique) < len(frames) else warped
    # 2. Characters, back to front, each warped in one call for the whole batch.
    fg_cams = [c[1] for c in cams]
    for sprite in stage.sprites:
        _draw_sprite(out, sprite, frames, fg_cams, shot.fps)
    return out


# --- slate ------------------------------------------------------------------------------
@functools.cache
def _font() -> ImageFont.ImageFont:
    # Pillow's built-in bitmap font: no font file, and the same pixels everywhere.
    return ImageFont.load_default_imagefont()


def _burn_slate(frame: np.ndarray, text: str) -> None:
    """Burn ``text`` into the top-left corner of one ``H x W x 3`` uint8 frame.

    Top-left, over the sky: the characters stand in the lower half, so it never hides them.
    """
    H, W = frame.shape[:2]
    scale = max(1, H // 216)
    font = _font()
    x0, y0, x1, y1 = font.getbbox(text)
    mask = Image.new("L", (x1 + 4, max(y1, 11) + 4), 0)
    ImageDraw.Draw(mask).text((2, 2), text, fill=255, font=font)
    if scale > 1:
        mask = mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)
    m = np.asarray(mask)
    pad = 2 * scale
    h = min(m.shape[0], H - pad)
    w = min(m.shape[1], W - pad)
    if h <= 0 or w <= 0:
        return
    region = frame[pad : pad + h, pad : pad + w]
    region[:] = (region.astype(np.uint16) * 90 >> 8).astype(np.uint8)  # darken the box
    region[m[:h, :w] > 127] = 255


# --- public API -------------------------------------------------------------------------
def _check_inputs(shot: ShotPlan, identities: dict[str, IdentityBundle]) -> None:
    if shot.width < 2 or shot.height < 2 or shot.frames < 1:
        raise BackendError(
            f"the animatic needs a shot of at least 2 x 2 pixels and 1 frame, got `width` "
            f"{shot.width}, `height` {shot.height}, `frames` {shot.frames} in shot {shot.shot_id!r}"
        )
    for name in shot.characters:
        bundle = identities.get(name)
        if bundle is None:
            raise BackendError(
                f"no identity for character {name!r} of shot {shot.shot_id!r} "
                f"(given: {sorted(identities) or 'none'})"
            )
        rgba = bundle.tensors.get("reference_rgba")
        array = _as_array(rgba) if rgba is not None else None
        fits = array is not None and array.dtype == np.uint8 and array.ndim == 3
        if not fits or array.shape[2] != 4 or 0 in array.shape:
            got = None if array is None else f"shape {tuple(array.shape)} dtype {array.dtype}"
            raise BackendError(
                f"the identity of character {name!r} needs a `reference_rgba` tensor "
                f"(H x W x 4 uint8), got {got}"
            )


def _as_array(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _render(
    shot: ShotPlan, identities: dict[str, IdentityBundle], frames: list[int], slate: bool
) -> np.ndarray:
    _check_inputs(shot, identities)
    stage = _stage(shot, identities)
    out = np.empty((len(frames), shot.height, shot.width, 3), np.uint8)
    for i in range(0, len(frames), _SUB_BATCH):
        batch = frames[i : i + _SUB_BATCH]
        drawn = _draw_frames(shot, stage, batch)
        # Colours carry +0.5 and stay within 0.5..255.5, so truncating to uint8 rounds.
        # One copy casts and reorders to H x W x 3 straight into the output.
        torch.from_numpy(out[i : i + len(batch)]).copy_(drawn.permute(0, 2, 3, 1))
    if slate:
        for n, frame in enumerate(frames):
            _burn_slate(out[n], f"{shot.scene_id}  {shot.shot_id}  F{frame:04d}")
    return out


def keyframe(shot: ShotPlan, identities: dict[str, IdentityBundle], frame: int) -> np.ndarray:
    """The staged frame ``frame`` of a shot, without the slate.

    The diffusers backend starts a shot from this image; it matches the animatic's own
    frame pixel for pixel outside the slate.

    Args:
        shot: the planned shot.
        identities: character name -> bundle with a ``reference_rgba`` tensor.
        frame: frame number within the shot (may run past its end).

    Returns:
        ``H x W x 3`` uint8 RGB.
    """
    if frame < 0:
        raise BackendError(f"`frame` must be >= 0, got {frame}")
    return _render(shot, identities, [frame], slate=False)[0]


class AnimaticBackend:
    """Render a chunk as an animatic: staged references, idle motion, camera move, slate."""

    name: ClassVar[str] = "animatic"

    def __init__(self, model: AnimaticModel | None = None, *, device: str = "cpu") -> None:
        from reelfarm.schemas.film import AnimaticModel

        self.model = model if model is not None else AnimaticModel()
        # The animatic always draws on the CPU whatever device the worker holds: CPU
        # arithmetic is what makes frames byte-identical on every worker.
        self.device = device

    @classmethod
    def load(
        cls, model: AnimaticModel | DiffusersModel, *, device: str = "cpu"
    ) -> AnimaticBackend:
        """The backend for an ``animatic`` model spec (there are no weights to load)."""
        if model.backend != "animatic":
            raise BackendError(f"the animatic cannot load `model.backend` {model.backend!r}")
        return cls(model, device=device)

    def encode_identity(self, character: str, reference: np.ndarray, sha256: str) -> IdentityBundle:
        """Encode a reference: its ``reference_rgba`` cut-out (see :func:`reference_rgba`).

        Args:
            character: the character's name in the film.
            reference: ``H x W x 3|4`` uint8 image.
            sha256: hash of the reference file's bytes.

        Returns:
            The bundle, keyed by the reference hash and the animatic's drawing version.
        """
        try:
            rgba = reference_rgba(reference)
        except BackendError as exc:
            raise BackendError(f"character {character!r}: {exc}") from None
        key = identity_key(self.model, sha256)
        return IdentityBundle(
            character=character,
            key=key,
            tensors={"reference_rgba": torch.from_numpy(rgba)},
            meta={"backend": self.name, "sha256": sha256, "version": ANIMATIC_VERSION},
        )

    def __call__(
        self,
        shot: ShotPlan,
        chunk: ChunkPlan,
        identities: dict[str, IdentityBundle],
        condition: Condition | None = None,
    ) -> ChunkOutput:
        """Render frames ``chunk.frame_start .. + num_frames - 1`` of ``shot``.

        Frame numbers alone drive the picture, so ``condition`` is not needed: a frame is
        the same whichever chunk draws it, which is what makes chunk seams invisible.
        """
        # 1. Check inputs.
        if chunk.frame_start < 0 or chunk.num_frames < 1:
            raise BackendError(
                f"chunk {chunk.name!r} needs `frame_start` >= 0 and `num_frames` >= 1, got "
                f"{chunk.frame_start} and {chunk.num_frames}"
            )
        # 2. Draw. A preview pass may hand a diffusers shot to the animatic: no slate field.
        frames = list(range(chunk.frame_start, chunk.frame_start + chunk.num_frames))
        slate = bool(getattr(shot.model, "slate", False))
        pixels = _render(shot, identities, frames, slate=slate)
        # 3. Package.
        return ChunkOutput(
            frames=pixels,
            latents=None,
            meta={
                "seed": chunk.seed,
                "backend": self.name,
                "versions": {
                    "animatic": ANIMATIC_VERSION,
                    "torch": torch.__version__,
                    "numpy": np.__version__,
                    "pillow": PIL.__version__,
                },
            },
        )

    def low_memory(self) -> None:
        """Nothing to do: the animatic holds no model, and its per-shot memo is bounded."""

    def close(self) -> None:
        """Drop the memoised shot layers (there is no model or device memory to release)."""
        with _STAGES_LOCK:
            _STAGES.clear()
