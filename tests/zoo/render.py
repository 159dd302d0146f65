"""Text images drawn with Pillow: document pages, single text lines, captchas (RGB uint8, HxWx3).

The font is Pillow's bundled scalable default (Aileron, Latin only; Pillow >= 10.1 with FreeType),
so nothing depends on the machine's fonts. Pixels depend on Pillow's and FreeType's versions,
which is why the zoo extra pins Pillow.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from tests.zoo import corpus


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    loaded = ImageFont.load_default(size=size)
    if not isinstance(loaded, ImageFont.FreeTypeFont):
        raise TypeError("the zoo's text rendering needs Pillow >= 10.1 built with FreeType")
    return loaded


def _paper(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A light, slightly uneven background: paper, a screen, a whiteboard."""
    base = rng.integers(205, 256, size=3)
    shade = rng.normal(0.0, 4.0, size=(height, width, 1)) + np.linspace(0, rng.normal(0, 12), width)[None, :, None]
    pixels = np.clip(base[None, None, :] + shade, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    dark = int(rng.integers(0, 70))
    return (dark + int(rng.integers(0, 30)), dark + int(rng.integers(0, 30)), dark + int(rng.integers(0, 50)))


def _camera(rng: np.random.Generator, image: Image.Image) -> np.ndarray:
    """A little defocus and sensor noise."""
    blurred = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.2))))
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0.0, 3.0, size=(image.height, image.width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def page(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A document page: a title, paragraphs of left-aligned lines, sometimes a second column."""
    image = _paper(rng, height, width)
    draw = ImageDraw.Draw(image)
    margin = int(rng.integers(width // 20, width // 8))
    columns = 2 if rng.random() < 0.3 else 1
    column_width = (width - 2 * margin) // columns
    y = int(rng.integers(height // 30, height // 10))
    title_size = int(rng.integers(26, 40))
    draw.text((margin, y), corpus.doc_line(rng, 28).upper(), font=font(title_size), fill=_ink(rng))
    y_start = y + int(title_size * 1.8)
    for column in range(columns):
        _paragraphs(rng, draw, margin + column * column_width, y_start, column_width - margin // 2, height)
    return _camera(rng, image)


def _paragraphs(rng: np.random.Generator, draw: ImageDraw.ImageDraw, x: int, y: int, width: int, height: int) -> None:
    size = int(rng.integers(14, 24))
    ink = _ink(rng)
    chars_per_line = max(4, int(width / (0.55 * size)))
    while y + size < height - size:
        indent = int(rng.integers(0, 3)) * size
        draw.text((x + indent, y), corpus.doc_line(rng, chars_per_line - indent // size), font=font(size), fill=ink)
        y += int(size * rng.uniform(1.3, 1.8))
        if rng.random() < 0.15:  # paragraph break
            y += size


def text_line(rng: np.random.Generator, text: str, size: int) -> np.ndarray:
    """One line of text cropped as a detector's box would be: a few pixels of margin around the ink."""
    left, top, right, bottom = font(size).getbbox(text)
    pad = np.maximum(1, (rng.uniform(0.05, 0.25, size=4) * size).astype(int))
    width, height = right - left + pad[0] + pad[2], bottom - top + pad[1] + pad[3]
    image = _paper(rng, int(height), int(width))
    ImageDraw.Draw(image).text((pad[0] - left, pad[1] - top), text, font=font(size), fill=_ink(rng))
    return _camera(rng, image)


def captcha(rng: np.random.Generator, text: str, height: int, width: int) -> np.ndarray:
    """A text captcha: coloured background, jittered rotated characters, noise arcs and dots."""
    background = tuple(int(v) for v in rng.integers(150, 256, size=3))
    image = Image.new("RGB", (width, height), background)
    step = width / (len(text) + 1)
    for index, char in enumerate(text):
        size = int(rng.integers(int(height * 0.55), int(height * 0.8)))
        glyph = Image.new("RGBA", (size * 2, size * 2), (0, 0, 0, 0))
        colour = (*(int(v) for v in rng.integers(0, 140, size=3)), 255)
        ImageDraw.Draw(glyph).text((size // 2, size // 3), char, font=font(size), fill=colour)
        glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.Resampling.BICUBIC)
        x = int(step * (index + 0.5) + rng.uniform(-0.15, 0.15) * step) - size // 2
        y = int((height - size * 2) / 2 + rng.uniform(-0.1, 0.1) * height)
        image.paste(glyph, (x, y), glyph)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        box = sorted(rng.integers(0, width, size=2)), sorted(rng.integers(0, height, size=2))
        draw.arc(
            (box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1),
            float(rng.uniform(0, 180)),
            float(rng.uniform(180, 360)),
            fill=tuple(int(v) for v in rng.integers(0, 200, size=3)),
            width=2,
        )
    for x, y in zip(rng.integers(0, width, size=width), rng.integers(0, height, size=width)):
        draw.point((int(x), int(y)), fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return np.asarray(image.filter(ImageFilter.SMOOTH), dtype=np.uint8)
