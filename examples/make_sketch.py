"""Draw examples/sketch.png: a pencil-style sketch of a two-storey house with windows and a tree.

It is the input of the README's recipes. Run it again to redraw the (committed) PNG:

    python examples/make_sketch.py [OUTPUT.png]
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 512, 384
PAPER = (246, 243, 234)
PENCIL = (70, 70, 78)


class Pencil:
    """Lines that wobble a little and are drawn twice, like a quick hand sketch (seeded: same every run)."""

    def __init__(self, draw: ImageDraw.ImageDraw, seed: int = 3):
        self.draw = draw
        self.rng = random.Random(seed)

    def line(self, x0: float, y0: float, x1: float, y1: float, width: int = 2, strokes: int = 2) -> None:
        length = math.hypot(x1 - x0, y1 - y0)
        n = max(2, int(length / 12))
        for _ in range(strokes):
            ox, oy = self.rng.uniform(-1.5, 1.5), self.rng.uniform(-1.5, 1.5)
            points = []
            for i in range(n + 1):
                t = i / n
                wobble = self.rng.uniform(-0.8, 0.8)
                points.append((x0 + (x1 - x0) * t + ox + wobble, y0 + (y1 - y0) * t + oy + wobble))
            self.draw.line(points, fill=PENCIL, width=width)

    def rect(self, x0: float, y0: float, x1: float, y1: float, width: int = 2) -> None:
        self.line(x0, y0, x1, y0, width)
        self.line(x1, y0, x1, y1, width)
        self.line(x1, y1, x0, y1, width)
        self.line(x0, y1, x0, y0, width)

    def hatch(self, x0: float, y0: float, x1: float, y1: float, gap: int = 7) -> None:
        """Diagonal shading inside a box."""
        for d in range(0, int((x1 - x0) + (y1 - y0)), gap):
            ax, ay = x0 + d, y0
            bx, by = x0, y0 + d
            if ax > x1:
                ay += ax - x1
                ax = x1
            if by > y1:
                bx += by - y1
                by = y1
            self.line(ax, ay, bx, by, width=1, strokes=1)

    def scribble_circle(self, cx: float, cy: float, r: float, loops: int = 3) -> None:
        for _ in range(loops):
            rr = r * self.rng.uniform(0.9, 1.05)
            points = []
            for i in range(41):
                a = 2 * math.pi * i / 40
                bump = 1 + 0.12 * math.sin(7 * a + self.rng.uniform(0, 1))
                points.append((cx + rr * bump * math.cos(a), cy + rr * 0.85 * bump * math.sin(a)))
            self.draw.line(points, fill=PENCIL, width=2)


def draw_sketch() -> Image.Image:
    img = Image.new("RGB", (WIDTH, HEIGHT), PAPER)
    p = Pencil(ImageDraw.Draw(img))
    ground = 320
    p.line(10, ground, 502, ground + 4)  # the ground

    # house body, two storeys, and a pitched roof
    left, right, top = 150, 350, 170
    p.rect(left, top, right, ground)
    p.line(left - 18, top + 2, 250, 80, width=3)
    p.line(250, 80, right + 18, top + 2, width=3)
    p.line(left - 18, top + 2, right + 18, top + 2)
    p.hatch(238, 120, 262, 150, gap=5)  # a small attic window, shaded
    p.rect(300, 100, 322, 140)  # chimney
    p.line(left, 245, right, 245, width=1, strokes=1)  # the floor line

    # windows: two upstairs, one downstairs beside the door
    for x in (175, 275):
        p.rect(x, 190, x + 50, 232)
        p.line(x + 25, 190, x + 25, 232, width=1)
        p.line(x, 211, x + 50, 211, width=1)
    p.rect(275, 262, 325, 302)
    p.line(300, 262, 300, 302, width=1)

    # the door, with a knob and steps
    p.rect(190, 258, 232, ground)
    p.scribble_circle(224, 291, 2, loops=1)
    p.line(182, ground + 8, 240, ground + 8, width=1)

    # a tree on the left: trunk, branches and a scribbled crown
    p.line(70, ground, 74, 215, width=3)
    p.line(88, ground, 84, 215, width=3)
    p.line(78, 240, 50, 205)
    p.line(80, 230, 110, 200)
    p.scribble_circle(80, 170, 58)
    p.scribble_circle(52, 185, 30, loops=2)
    p.scribble_circle(112, 182, 30, loops=2)

    # a bush on the right and a path to the door
    p.scribble_circle(410, 300, 28, loops=2)
    p.line(200, ground + 8, 150, 378, width=1)
    p.line(222, ground + 8, 272, 378, width=1)

    # a few birds and a sun
    for x, y in ((380, 60), (410, 75), (440, 55)):
        p.line(x - 8, y - 4, x, y, width=1, strokes=1)
        p.line(x, y, x + 8, y - 4, width=1, strokes=1)
    p.scribble_circle(470, 40, 18, loops=2)

    return img.filter(ImageFilter.SMOOTH)  # soften the strokes a little, like graphite


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("sketch.png")
    draw_sketch().save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
