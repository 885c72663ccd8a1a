"""Image and audio files for tests of the media path (Pillow, the stdlib `wave`).

path = write_image(tmp / "a.png", 300, 500, seed=1)     # random RGB pixels
path = write_wav(tmp / "a.wav", samples)                # 16-bit mono PCM
"""

from __future__ import annotations

import os
import wave

import numpy as np
from PIL import Image


def write_image(
    path: str | os.PathLike, height: int, width: int, seed: int = 0, mode: str = "RGB"
) -> str:
    """A `height` x `width` image of seeded random pixels, saved as `mode`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return str(path)


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int = 16000) -> str:
    """`samples` (floats in [-1, 1]) as a 16-bit mono PCM WAV file."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.round(np.asarray(samples) * 32767).astype("<i2").tobytes())
    return str(path)
