"""Draw the example films' reference images: small RGBA PNGs, the same pixels every run.

    python examples/make_refs.py            # writes examples/*/refs/*.png

Each figure is drawn with PIL at 4x size and scaled down (premultiplied, so edges stay
clean), on a transparent background. Only PIL primitives are used: no fonts, no files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
SS = 4  # supersampling factor

Point = tuple[float, float]


class Sketch:
    """A transparent canvas drawn in final-pixel units at ``SS`` times the size."""

    def __init__(self, width: int, height: int) -> None:
        self.size = (width, height)
        self.image = Image.new("RGBA", (width * SS, height * SS), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)

    @staticmethod
    def _p(points: list[Point]) -> list[Point]:
        return [(x * SS, y * SS) for x, y in points]

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill, outline=None, width=0):
        box = [(cx - rx) * SS, (cy - ry) * SS, (cx + rx) * SS, (cy + ry) * SS]
        self.draw.ellipse(box, fill=fill, outline=outline, width=int(width * SS))

    def circle(self, cx: float, cy: float, r: float, fill, outline=None, width=0):
        self.ellipse(cx, cy, r, r, fill, outline, width)

    def polygon(self, points: list[Point], fill, outline=None, width=0):
        self.draw.polygon(self._p(points), fill=fill, outline=outline, width=int(width * SS))

    def line(self, points: list[Point], fill, width: float):
        self.draw.line(self._p(points), fill=fill, width=max(1, int(width * SS)), joint="curve")

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill, radius: float = 0):
        box = [x0 * SS, y0 * SS, x1 * SS, y1 * SS]
        self.draw.rounded_rectangle(box, radius=radius * SS, fill=fill)

    def arc(self, cx, cy, rx, ry, start, end, fill, width: float):
        box = [(cx - rx) * SS, (cy - ry) * SS, (cx + rx) * SS, (cy + ry) * SS]
        self.draw.arc(box, start, end, fill=fill, width=max(1, int(width * SS)))

    def glow(self, cx: float, cy: float, rx: float, ry: float, colour, blur: float) -> None:
        """A soft halo behind what is drawn next (blurred on its own layer)."""
        layer = Image.new("RGBA", self.image.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        d.ellipse([(cx - rx) * SS, (cy - ry) * SS, (cx + rx) * SS, (cy + ry) * SS], fill=colour)
        layer = layer.filter(ImageFilter.GaussianBlur(blur * SS))
        self.image = Image.alpha_composite(self.image, layer)
        self.draw = ImageDraw.Draw(self.image)

    def eye(self, cx: float, cy: float, r: float, look: Point = (0.25, 0.2)) -> None:
        """A big round cartoon eye: white, a dark pupil looking somewhere, a glint."""
        self.circle(cx, cy, r, fill=(255, 255, 255, 255), outline=(40, 30, 30, 255), width=r / 8)
        px, py = cx + look[0] * r, cy + look[1] * r
        self.circle(px, py, r * 0.5, fill=(25, 20, 30, 255))
        self.circle(px - r * 0.18, py - r * 0.2, r * 0.16, fill=(255, 255, 255, 255))

    def save(self, path: Path) -> None:
        out = self.image.convert("RGBa").resize(self.size, Image.Resampling.LANCZOS)
        path.parent.mkdir(parents=True, exist_ok=True)
        out.convert("RGBA").save(path, optimize=True)


def teardrop(cx: float, base: float, height: float, half_width: float, n: int = 96) -> list[Point]:
    """A flame-shaped teardrop pointing up: round at ``base``, its tip ``height`` above."""
    points = []
    for i in range(n):
        t = 2 * math.pi * i / n
        u = math.cos(t)  # 1 at the tip, -1 at the round bottom
        v = math.sin(t) * math.sin(t / 2) ** 1.4
        points.append((cx + v * half_width * 1.45, base - (u + 1) / 2 * height))
    return points


# --- characters -------------------------------------------------------------------------
def flame() -> Sketch:
    s = Sketch(160, 256)
    s.glow(80, 120, 62, 82, (255, 170, 60, 110), blur=10)
    # Candle stub, a wax drip and the wick.
    s.rect(48, 196, 112, 256, fill=(242, 232, 214, 255), radius=6)
    s.ellipse(80, 197, 32, 7, fill=(252, 246, 232, 255))
    s.rect(96, 196, 104, 222, fill=(252, 246, 232, 255), radius=4)
    s.line([(80, 198), (80, 184)], fill=(60, 45, 40, 255), width=3)
    # Three nested teardrops: orange, gold, pale yellow.
    s.polygon(teardrop(80, 192, 176, 52), fill=(255, 122, 18, 255))
    s.polygon(teardrop(80, 186, 140, 40), fill=(255, 180, 40, 255))
    s.polygon(teardrop(80, 178, 92, 26), fill=(255, 238, 150, 255))
    # Big round eyes and a small smile.
    s.eye(64, 128, 15, look=(0.3, 0.15))
    s.eye(98, 128, 15, look=(0.3, 0.15))
    s.arc(81, 150, 10, 7, 20, 160, fill=(120, 40, 10, 255), width=2.5)
    s.ellipse(55, 148, 6, 3.5, fill=(255, 110, 80, 160))
    s.ellipse(107, 148, 6, 3.5, fill=(255, 110, 80, 160))
    return s


def moth() -> Sketch:
    s = Sketch(224, 192)
    cx = 112
    for side in (-1, 1):
        # Fore wing, hind wing, darker rims and an eye spot on each.
        fore = [(cx, 84), (cx + side * 40, 28), (cx + side * 92, 18), (cx + side * 106, 50),
                (cx + side * 88, 96), (cx + side * 30, 104)]
        hind = [(cx, 100), (cx + side * 62, 104), (cx + side * 76, 140), (cx + side * 50, 168),
                (cx + side * 16, 150)]
        s.polygon(hind, fill=(176, 150, 120, 255), outline=(120, 95, 70, 255), width=3)
        s.polygon(fore, fill=(214, 192, 156, 255), outline=(140, 110, 80, 255), width=3)
        s.circle(cx + side * 66, 56, 13, fill=(150, 110, 80, 255))
        s.circle(cx + side * 66, 56, 7, fill=(240, 220, 180, 255))
        s.circle(cx + side * 46, 136, 8, fill=(150, 120, 90, 255))
        # Feathery antennae.
        tip = (cx + side * 44, 6)
        s.line([(cx + side * 6, 52), (cx + side * 22, 24), tip], fill=(90, 70, 50, 255), width=2.5)
        for k in range(4):
            bx = cx + side * (12 + 8 * k)
            by = 40 - 9 * k
            s.line([(bx, by), (bx + side * 7, by - 2)], fill=(90, 70, 50, 255), width=1.5)
    # Fuzzy body and head with big dark eyes.
    s.ellipse(cx, 116, 15, 46, fill=(120, 92, 66, 255))
    for k in range(4):
        s.ellipse(cx, 104 + 16 * k, 14, 4, fill=(98, 74, 52, 255))
    s.circle(cx, 66, 20, fill=(150, 118, 86, 255))
    s.eye(cx - 10, 62, 10, look=(-0.1, 0.25))
    s.eye(cx + 10, 62, 10, look=(0.1, 0.25))
    return s


def _quadruped(
    s: Sketch, *, body: tuple, coat, dark, legs: list[float], leg_top: float, ground: float,
    leg_w: float, head: tuple, ear, tail: list[Point],
) -> None:
    bx, by, brx, bry = body
    s.line(tail, fill=dark, width=5)
    for i, lx in enumerate(legs):
        shade = dark if i % 2 else coat
        s.rect(lx - leg_w / 2, leg_top, lx + leg_w / 2, ground, fill=shade, radius=leg_w / 3)
        s.rect(lx - leg_w / 2 - 1, ground - 8, lx + leg_w / 2 + 1, ground, fill=(40, 30, 25, 255),
               radius=2)
    s.ellipse(bx, by, brx, bry, fill=coat)
    hx, hy, hrx, hry = head
    s.ellipse(ear[0], ear[1], ear[2], ear[3], fill=dark)
    s.ellipse(hx, hy, hrx, hry, fill=coat)


def buffalo() -> Sketch:
    s = Sketch(256, 192)
    coat, dark = (96, 62, 40, 255), (70, 44, 28, 255)
    _quadruped(s, body=(146, 96, 92, 52), coat=coat, dark=dark, legs=[84, 108, 182, 206],
               leg_top=110, ground=188, leg_w=20, head=(58, 100, 38, 34),
               ear=(30, 80, 14, 8), tail=[(236, 84), (250, 120), (246, 138)])
    s.ellipse(120, 62, 62, 36, fill=dark)  # the hump
    s.ellipse(60, 132, 28, 14, fill=(80, 50, 32, 255))  # beard
    horn = (230, 222, 200, 255)
    for side in (-1, 1):  # tapered horns: out from the brow, then up
        for i in range(24):
            t = i / 23
            x = 58 + side * (26 + 22 * math.sin(t * 1.9))
            y = 76 - 26 * t * t
            s.circle(x, y, 5.5 * (1 - t) + 1.2, fill=horn)
    s.ellipse(46, 116, 16, 11, fill=(150, 110, 90, 255))  # muzzle
    s.circle(40, 114, 2.5, fill=(40, 25, 20, 255))
    s.circle(52, 114, 2.5, fill=(40, 25, 20, 255))
    s.eye(44, 92, 9, look=(-0.3, 0.1))
    s.eye(70, 92, 9, look=(-0.3, 0.1))
    return s


def calf() -> Sketch:
    s = Sketch(176, 144)
    coat, dark = (200, 150, 100, 255), (160, 112, 70, 255)
    _quadruped(s, body=(104, 78, 52, 32), coat=coat, dark=dark, legs=[70, 86, 124, 140],
               leg_top=86, ground=142, leg_w=13, head=(44, 62, 32, 30),
               ear=(18, 44, 14, 7), tail=[(152, 66), (164, 90)])
    s.ellipse(70, 44, 12, 6, fill=dark)
    s.ellipse(118, 70, 16, 11, fill=(240, 225, 200, 255))  # a pale spot
    s.ellipse(34, 78, 14, 10, fill=(236, 190, 160, 255))  # muzzle
    s.eye(32, 56, 11, look=(-0.2, 0.2))
    s.eye(58, 56, 11, look=(-0.2, 0.2))
    return s


def goat() -> Sketch:
    s = Sketch(176, 176)
    coat, dark = (240, 236, 226, 255), (200, 194, 182, 255)
    _quadruped(s, body=(104, 100, 54, 34), coat=coat, dark=dark, legs=[72, 88, 122, 138],
               leg_top=108, ground=174, leg_w=12, head=(46, 70, 26, 30),
               ear=(20, 58, 16, 6), tail=[(154, 84), (166, 72)])
    for dx in (-8, 8):  # swept-back horns
        s.arc(52 + dx, 40, 20, 24, 200, 330, fill=(130, 110, 90, 255), width=6)
    s.polygon([(36, 96), (50, 96), (42, 124)], fill=dark)  # beard
    s.eye(36, 66, 9, look=(-0.25, 0.1))
    s.eye(58, 66, 9, look=(-0.25, 0.1))
    s.ellipse(36, 88, 9, 6, fill=(230, 190, 180, 255))
    return s


def mug() -> Sketch:
    s = Sketch(192, 192)
    red, rim = (200, 36, 40, 255), (150, 20, 26, 255)
    for k, x in enumerate((72, 92, 112)):  # steam
        wave = [(x + 8 * math.sin(i / 3 + k), 60 - i * 3.2) for i in range(16)]
        s.line(wave, fill=(235, 235, 240, 150), width=4)
    s.ellipse(148, 124, 32, 34, fill=None, outline=rim, width=12)  # handle
    s.rect(36, 68, 148, 184, fill=red, radius=16)
    s.rect(50, 80, 62, 170, fill=(235, 110, 110, 200), radius=6)  # highlight
    s.ellipse(92, 70, 56, 12, fill=rim)
    s.ellipse(92, 71, 50, 9, fill=(90, 50, 30, 255))  # coffee
    s.ellipse(92, 182, 56, 6, fill=rim)
    return s


def sneaker() -> Sketch:
    s = Sketch(256, 144)
    upper = [(18, 104), (30, 72), (70, 62), (118, 40), (150, 24), (184, 22), (206, 34),
             (222, 62), (238, 92), (240, 112), (18, 112)]
    s.polygon(upper, fill=(248, 248, 246, 255), outline=(170, 170, 176, 255), width=2)
    s.rect(8, 106, 248, 130, fill=(214, 216, 222, 255), radius=10)  # sole
    for x in range(20, 244, 14):
        s.rect(x, 124, x + 8, 134, fill=(120, 124, 132, 255), radius=2)  # tread
    stripe = [(70, 96), (120, 72), (176, 60), (214, 70), (180, 76), (130, 90), (92, 104)]
    s.polygon(stripe, fill=(40, 110, 220, 255))
    for i in range(5):  # laces
        x = 118 + i * 14
        s.line([(x, 50 - i * 4), (x + 14, 60 - i * 4)], fill=(60, 60, 70, 255), width=3)
    s.rect(206, 34, 224, 70, fill=(40, 110, 220, 255), radius=5)  # heel tab
    s.ellipse(30, 104, 14, 6, fill=(236, 236, 238, 255))
    return s


# Which reference goes where. The tiny example reuses the flame film's two figures.
REFS: dict[str, Callable[[], Sketch]] = {
    "lonely_flame/refs/flame.png": flame,
    "lonely_flame/refs/moth.png": moth,
    "tiny/refs/flame.png": flame,
    "tiny/refs/moth.png": moth,
    "the_herd/refs/buffalo.png": buffalo,
    "the_herd/refs/calf.png": calf,
    "the_herd/refs/goat.png": goat,
    "campaign/refs/mug.png": mug,
    "campaign/refs/sneaker.png": sneaker,
}


def main() -> None:
    for rel, make in REFS.items():
        path = HERE / rel
        make().save(path)
        print(f"{path.relative_to(HERE)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
