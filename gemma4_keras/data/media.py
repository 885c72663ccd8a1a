"""Images and audio in chat records: reading, checking, soft-token counts, features.

A message's content may be a list of parts (`records.normalise_messages`):

    {"type": "text", "text": "..."}
    {"type": "image", "path" | "url" | "image": "..."}   {"type": "image_url", "image_url": {"url": "..."}}
    {"type": "audio", "path" | "url" | "audio": ...}     {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}

A reference is a file path (relative paths resolve against the data file's
directory), a `file://` URL or a `data:...;base64,` URI; an `audio` value may
also be a list of samples (16 kHz, floats in [-1, 1]). `http(s)://` URLs are
refused (a training set must read the same on every run and offline:
download the file and name its path). Each part becomes its placeholder in
the text (`<|image|>`, `<|audio|>`, as the chat template writes it) and a
plain, JSON-serialisable media record on the message:

    {"type": "image", "source": "/data/cat.png", "sha256": "...",
     "height": 300, "width": 500, "soft_tokens": 252}
    {"type": "audio", "source": "/data/a.wav", "sha256": "...",
     "samples": 32123, "soft_tokens": 50}

The tokenizer (`tokenize.py`) expands each placeholder id into the begin
marker, `soft_tokens` soft tokens and the end marker, as the Hugging Face
`Gemma4Processor` does (`replace_image_token`, `replace_audio_token`):

    <|image|>  ->  <|image> <|image|> x 252 <image|>      (a 300 x 500 image)
    <|audio|>  ->  <|audio> <|audio|> x 50 <audio|>       (2.0 s at 16 kHz)

Decoding: images with Pillow, as transformers' `load_image` (EXIF
orientation applied, converted to RGB) and the Pillow image processor
`Gemma4ImageProcessorPil` (bicubic resize to the largest size with at most
`max_soft_tokens * pooling_kernel_size**2` patches and sides divisible by
`pooling_kernel_size * patch_size`, rescale by 1/255, 16 x 16 patches).
Audio: PCM WAV with the standard library's `wave` (no soundfile or soxr
here), channels averaged; a rate other than 16 kHz is refused (the
processor resamples with soxr, which this package does not reimplement),
as is a clip longer than the 30 s the feature extractor keeps. Log-mel
features follow `Gemma4AudioFeatureExtractor` in numpy. The values are the
transformers classes' defaults (`PROCESSOR`), which the released Gemma 4
`processor_config.json` files use (image_seq_length 280, audio 16 kHz), or
what a checkpoint's `processor_config.json` sets (`processor_settings`:
image patch / pooling / max soft tokens, the mel settings); a record made
with other values keeps them under "processor" (`settings_of`), so its
features are made as it was counted.
Tests: tests/test_media_data.py compares ids, pixel values and features with
transformers' processor.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import warnings
import wave
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IMAGE, AUDIO = "image", "audio"
KINDS = (IMAGE, AUDIO)
PLACEHOLDER = {IMAGE: "<|image|>", AUDIO: "<|audio|>"}
BEGIN = {IMAGE: "<|image>", AUDIO: "<|audio>"}
END = {IMAGE: "<image|>", AUDIO: "<audio|>"}
# Every media token; none may appear in text (they are structure).
TOKENS = tuple(PLACEHOLDER.values()) + tuple(BEGIN.values()) + tuple(END.values())
PART_TYPES = ("text", "image", "image_url", "audio", "input_audio")


@dataclasses.dataclass(frozen=True)
class ProcessorSettings:
    """The Hugging Face Gemma 4 processor's values (its classes' defaults).

    Attributes:
        patch_size: vision patch side in pixels.
        pooling_kernel_size: patches pooled per soft token along each side.
        max_soft_tokens: soft tokens per image at most (70, 140, 280, 560, 1120).
        sampling_rate: audio samples per second.
        feature_size: mel bins.
        frame_length, hop_length: STFT window and hop in samples (20 ms, 10 ms).
        fft_length: FFT size.
        min_frequency, max_frequency: the mel filter bank's range in Hz.
        mel_floor: added before the log.
        max_audio_samples: the feature extractor's `max_length` (30 s).
        pad_to_multiple_of: the feature extractor pads the waveform to this.
        audio_seq_length: soft tokens per clip at most.
    """

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280
    sampling_rate: int = 16_000
    feature_size: int = 128
    frame_length: int = 320
    hop_length: int = 160
    fft_length: int = 512
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    mel_floor: float = 1e-3
    max_audio_samples: int = 480_000
    pad_to_multiple_of: int = 128
    audio_seq_length: int = 750

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2


PROCESSOR = ProcessorSettings()

# processor_config.json (as `Gemma4Processor.save_pretrained` writes it):
# section -> {its key: our field}; "" is the top level.
PROCESSOR_KEYS = {
    "image_processor": {
        "patch_size": "patch_size",
        "pooling_kernel_size": "pooling_kernel_size",
        "max_soft_tokens": "max_soft_tokens",
    },
    "feature_extractor": {
        "sampling_rate": "sampling_rate",
        "feature_size": "feature_size",
        "frame_length": "frame_length",
        "hop_length": "hop_length",
        "fft_length": "fft_length",
        "min_frequency": "min_frequency",
        "max_frequency": "max_frequency",
        "mel_floor": "mel_floor",
    },
}
# Not read: `audio_seq_length` (the processor's `replace_audio_token` expands
# a clip by its mask, without that cap; only its token-count helper caps).
# Settings the processor has that this module does not reproduce: only
# their defaults are accepted (another value would give other features).
PROCESSOR_DEFAULTS_ONLY = {
    "feature_extractor": {
        "preemphasis": 0.0,
        "dither": 0.0,
        "input_scale_factor": 1.0,
        "fft_overdrive": False,
        "per_bin_mean": None,
        "per_bin_stddev": None,
    },
    "image_processor": {"do_normalize": False, "do_rescale": True, "resample": 3},
}


def processor_settings(config: Mapping | str | os.PathLike | None) -> ProcessorSettings:
    """The settings of a checkpoint's `processor_config.json` (a directory,
    the file, or its parsed dict); the defaults for what it does not set
    (the tiny checkpoints' file is empty).

    Raises:
        MediaError: a value this package does not reproduce, named.

    Example:
        >>> processor_settings({"image_processor": {"max_soft_tokens": 70}}).max_soft_tokens
        70
        >>> processor_settings(None) == PROCESSOR
        True
    """
    source = "processor_config.json"
    if isinstance(config, (str, os.PathLike)):
        source = os.fspath(config)
        if os.path.isdir(source):
            source = os.path.join(source, "processor_config.json")
        if not os.path.isfile(source):
            return PROCESSOR
        with open(source) as f:
            config = json.load(f)
    config = config or {}
    values = {}
    for section, keys in PROCESSOR_KEYS.items():
        part = config.get(section) or {} if section else config
        values.update({ours: part[k] for k, ours in keys.items() if k in part})
    for section, defaults in PROCESSOR_DEFAULTS_ONLY.items():
        part = config.get(section) or {}
        for key, default in defaults.items():
            if part.get(key, default) != default:
                raise MediaError(
                    f"{source}: {section}.{key}={part[key]!r}; this package "
                    f"reproduces the processor only with {default!r}"
                )
    return dataclasses.replace(PROCESSOR, **values)


class MediaError(ValueError):
    """A media part that cannot be used; the message says which and why."""


# --------------------------------------------------------------------------
# Soft-token counts
# --------------------------------------------------------------------------


def image_target_size(
    height: int, width: int, settings: ProcessorSettings = PROCESSOR
) -> tuple[int, int]:
    """The size the processor resizes an image to (transformers'
    `get_aspect_ratio_preserving_size`).

    Example:
        >>> image_target_size(300, 500)
        (576, 1008)
    """
    patch, pool = settings.patch_size, settings.pooling_kernel_size
    target_px = settings.max_patches * patch**2
    factor = math.sqrt(target_px / (height * width))
    side = pool * patch
    target_h = int(math.floor(factor * height / side)) * side
    target_w = int(math.floor(factor * width / side)) * side
    if target_h == 0 and target_w == 0:
        raise MediaError(f"a {height} x {width} image resizes to 0 x 0")
    longest = (settings.max_patches // pool**2) * side
    if target_h == 0:
        target_h, target_w = side, min(int(math.floor(width / height)) * side, longest)
    elif target_w == 0:
        target_w, target_h = side, min(int(math.floor(height / width)) * side, longest)
    return target_h, target_w


def image_soft_tokens(
    height: int, width: int, settings: ProcessorSettings = PROCESSOR
) -> int:
    """Soft tokens of a `height` x `width` image.

    Example:
        >>> image_soft_tokens(896, 896), image_soft_tokens(300, 500)
        (256, 252)
    """
    h, w = image_target_size(height, width, settings)
    patches = (h // settings.patch_size) * (w // settings.patch_size)
    return patches // settings.pooling_kernel_size**2


def audio_soft_tokens(samples: int, settings: ProcessorSettings = PROCESSOR) -> int:
    """Soft tokens of a clip of `samples` samples (the processor's `replace_audio_token`).

    A mel frame counts when its whole window is audio, not padding; the two
    stride-2 convolutions of the audio tower keep every other frame twice.

    Example:
        >>> audio_soft_tokens(16_000 * 2 + 123)
        50
    """
    samples = min(samples, settings.max_audio_samples)
    pad_left = settings.frame_length // 2
    last = settings.frame_length  # the unfold window is frame_length + 1 samples
    valid = max(0, (samples + pad_left - 1 - last) // settings.hop_length + 1)
    for _ in range(2):
        valid = -(-valid // 2)
    return min(valid, settings.audio_seq_length)


# --------------------------------------------------------------------------
# Parts -> media records
# --------------------------------------------------------------------------


def _reference(part: Mapping, kind: str) -> Any:
    """The reference a part names (path, URL, data URI, samples)."""
    ptype = part.get("type")
    if ptype == "image_url":
        value = part.get("image_url")
        return value.get("url") if isinstance(value, Mapping) else value
    if ptype == "input_audio":
        value = part.get("input_audio")
        if not isinstance(value, Mapping) or not isinstance(value.get("data"), str):
            raise MediaError("an input_audio part needs input_audio.data (base64)")
        fmt = str(value.get("format") or "wav").lower()
        if fmt != "wav":
            raise MediaError(f"input_audio format {fmt!r}: only wav is read")
        return "data:audio/wav;base64," + value["data"]
    keys = [k for k in ("path", "url", kind) if part.get(k) is not None]
    if len(keys) != 1:
        raise MediaError(
            f"an {kind} part needs exactly one of path, url, {kind} (got "
            f"{', '.join(keys) or 'none'})"
        )
    return part[keys[0]]


def _load_bytes(ref: Any, base_dir: str | None) -> tuple[str, bytes]:
    """(source, bytes) of a string reference."""
    if not isinstance(ref, str) or not ref:
        raise MediaError(f"expected a path, file:// or data: URI, got {ref!r:.60}")
    if ref.startswith(("http://", "https://")):
        raise MediaError(
            f"{ref[:80]}: URLs are not fetched (a training set must read the same "
            "offline, on every run); download the file and give its path"
        )
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise MediaError("a data: URI must be base64 (data:...;base64,...)")
        try:
            return "inline", base64.b64decode(payload, validate=True)
        except ValueError as e:
            raise MediaError(f"the data: URI is not valid base64 ({e})") from e
    path = ref.removeprefix("file://")
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        raise MediaError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return path, f.read()
    except OSError as e:
        raise MediaError(f"{path}: cannot read it ({e.strerror})") from e


def _open_image(data: bytes, source: str):
    from PIL import Image, ImageOps  # Pillow: only data with images needs it

    try:
        with (
            warnings.catch_warnings()
        ):  # the size is checked below, with the file named
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Exception as e:  # Pillow raises several types for bad files
        raise MediaError(f"{source}: not an image Pillow can read ({e})") from e
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise MediaError(
            f"{source}: {width} x {height} pixels is more than Pillow's limit of "
            f"{limit} (PIL.Image.MAX_IMAGE_PIXELS); downscale it"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as e:
        raise MediaError(f"{source}: cannot decode the image ({e})") from e
    return image.convert("RGB")  # transformers' load_image


def _describe_image(source: str, data: bytes, settings: ProcessorSettings) -> dict:
    image = _open_image(data, source)
    width, height = image.size
    return {
        "type": IMAGE,
        "source": source,
        "sha256": hashlib.sha256(data).hexdigest(),
        "height": height,
        "width": width,
        "soft_tokens": image_soft_tokens(height, width, settings),
    }


def _wav_samples(data: bytes, source: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of a PCM WAV file (soundfile's scaling)."""
    try:
        with wave.open(io.BytesIO(data)) as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            frames = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as e:
        raise MediaError(
            f"{source}: not a PCM WAV file the standard library reads ({e}); "
            "convert it to 16 kHz PCM WAV"
        ) from e
    if width == 1:
        x = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dtype = np.dtype(f"<i{width}")
        x = np.frombuffer(frames, dtype).astype(np.float64) / 2.0 ** (8 * width - 1)
    elif width == 3:
        raw = np.frombuffer(frames, np.uint8).reshape(-1, 3).astype(np.int32)
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        x = np.where(value >= 1 << 23, value - (1 << 24), value) / 2.0**23
    else:
        raise MediaError(f"{source}: {8 * width}-bit samples are not read")
    x = np.asarray(x, np.float32).reshape(-1, channels)
    return x.mean(axis=1) if channels > 1 else x[:, 0], rate


def _audio_samples(
    ref: Any, base_dir: str | None, settings: ProcessorSettings
) -> tuple[str, np.ndarray, str]:
    """(source, samples, sha256) of an audio reference."""
    if isinstance(ref, (list, tuple)):
        x = np.asarray(ref, np.float32)
        if x.ndim != 1 or not np.all(np.isfinite(x)):
            raise MediaError("inline audio must be a flat list of finite samples")
        return "inline", x, hashlib.sha256(x.tobytes()).hexdigest()
    source, data = _load_bytes(ref, base_dir)
    x, rate = _wav_samples(data, source)
    if rate != settings.sampling_rate:
        raise MediaError(
            f"{source}: {rate} Hz; the processor reads {settings.sampling_rate} Hz "
            "audio (resample it, e.g. `sox in.wav -r 16000 out.wav`)"
        )
    return source, x, hashlib.sha256(data).hexdigest()


def _describe_audio(
    ref: Any, base_dir: str | None, settings: ProcessorSettings
) -> dict:
    source, x, digest = _audio_samples(ref, base_dir, settings)
    seconds = len(x) / settings.sampling_rate
    if len(x) > settings.max_audio_samples:
        limit = settings.max_audio_samples / settings.sampling_rate
        raise MediaError(
            f"{source}: {seconds:.1f} s is longer than the {limit:g} s the feature "
            "extractor keeps (it would cut the rest); split the clip"
        )
    record = {"type": AUDIO, "source": source, "sha256": digest, "samples": len(x)}
    if source == "inline":
        record["samples_data"] = x.tolist()
    record["soft_tokens"] = audio_soft_tokens(len(x), settings)
    if record["soft_tokens"] == 0:
        raise MediaError(
            f"{source}: {seconds * 1000:.0f} ms is too short for one token"
        )
    return record


def describe_part(
    part: Mapping, base_dir: str | None = None, settings: ProcessorSettings = PROCESSOR
) -> dict:
    """The media record of an image or audio part (the file is read and checked).

    Raises:
        MediaError: a missing, unreadable or oversized file, or a bad part.
    """
    ptype = part.get("type")
    kind = IMAGE if ptype in ("image", "image_url") else AUDIO
    ref = _reference(part, kind)
    if kind == AUDIO:
        return _with_settings(_describe_audio(ref, base_dir, settings), settings)
    if not isinstance(ref, str):
        raise MediaError(
            f"an image reference must be a string, got {type(ref).__name__}"
        )
    source, data = _load_bytes(ref, base_dir)
    record = _describe_image(source, data, settings)
    if source == "inline":
        record["data"] = base64.b64encode(data).decode("ascii")
    return _with_settings(record, settings)


def _with_settings(record: dict, settings: ProcessorSettings) -> dict:
    """`record`, with the settings that differ from the defaults under
    "processor" (the features are then made with them: `settings_of`)."""
    changed = {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != getattr(PROCESSOR, f.name)
    }
    if changed:
        record["processor"] = changed
    return record


def settings_of(record: Mapping) -> ProcessorSettings:
    """The processor settings a media record was described with.

    >>> settings_of({"processor": {"max_soft_tokens": 70}}).max_patches
    630
    """
    return dataclasses.replace(PROCESSOR, **(record.get("processor") or {}))


def image_data_uri(pixels: np.ndarray) -> str:
    """A `data:image/png;base64,` URI of a uint8 [height, width(, 1|3|4)]
    array (a TFDS `Image` feature), lossless: it decodes to the same pixels.

    >>> image_data_uri(np.zeros((2, 2, 3), np.uint8))[:22]
    'data:image/png;base64,'
    """
    from PIL import Image  # Pillow: only data with images needs it

    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]  # grayscale
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise MediaError(
            f"an image array must be uint8 [height, width(, channels)], got "
            f"{pixels.dtype} {list(pixels.shape)}"
        )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def as_part(record: Mapping) -> dict:
    """The content part that reads back as `record` (for written splits).

    Example:
        >>> as_part({"type": "image", "source": "/d/cat.png", "soft_tokens": 4})
        {'type': 'image', 'path': '/d/cat.png'}
    """
    if record.get("data"):
        return {"type": IMAGE, "image": "data:image;base64," + record["data"]}
    if record.get("samples_data") is not None:
        return {"type": AUDIO, "audio": list(record["samples_data"])}
    return {"type": record["type"], "path": record["source"]}


# --------------------------------------------------------------------------
# Features, equal to the Hugging Face processor's
# --------------------------------------------------------------------------


def _record_bytes(record: Mapping) -> bytes:
    if record.get("data"):
        return base64.b64decode(record["data"])
    with open(record["source"], "rb") as f:
        return f.read()


def image_features(
    record: Mapping, settings: ProcessorSettings | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values [max_patches, 3 * patch**2] float32, position_ids [max_patches, 2] int64).

    As `Gemma4ImageProcessorPil`: bicubic resize with Pillow, rescale by
    1/255, patches in row-major order (each patch row-major, channels last),
    padded with zeros (positions -1) to `max_patches`.
    """
    from PIL import Image  # Pillow: only data with images needs it

    settings = settings or settings_of(record)
    image = _open_image(_record_bytes(record), record["source"])
    height, width = image.height, image.width
    target_h, target_w = image_target_size(height, width, settings)
    if (target_h, target_w) != (height, width):
        image = image.resize((target_w, target_h), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    p = settings.patch_size
    gh, gw = target_h // p, target_w // p
    patches = pixels.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(gh * gw, p * p * 3)
    grid_x, grid_y = np.meshgrid(np.arange(gw), np.arange(gh), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(gh * gw, 2)
    pad = settings.max_patches - len(patches)
    patches = np.pad(patches, [(0, pad), (0, 0)])
    positions = np.pad(positions, [(0, pad), (0, 0)], constant_values=-1)
    return patches, positions.astype(np.int64)


def _mel_filters(settings: ProcessorSettings) -> np.ndarray:
    """HTK mel filter bank [fft_length // 2 + 1, feature_size] (transformers' `mel_filter_bank`)."""

    def to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(
        to_mel(settings.min_frequency),
        to_mel(settings.max_frequency),
        settings.feature_size + 2,
    )
    filter_freqs = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    fft_freqs = np.linspace(
        0, settings.sampling_rate // 2, settings.fft_length // 2 + 1
    )
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


def audio_samples(
    record: Mapping, settings: ProcessorSettings = PROCESSOR
) -> np.ndarray:
    """The clip's float32 samples (16 kHz, mono)."""
    if record.get("samples_data") is not None:
        return np.asarray(record["samples_data"], np.float32)
    return _audio_samples(record["source"], None, settings)[1]


def audio_frames(samples: int, settings: ProcessorSettings = PROCESSOR) -> int:
    """Log-mel frames `audio_features` makes of a clip of `samples` samples."""
    n = min(samples, settings.max_audio_samples)
    padded = -(-n // settings.pad_to_multiple_of) * settings.pad_to_multiple_of
    length = padded + settings.frame_length // 2
    return max((length - settings.frame_length - 1) // settings.hop_length + 1, 0)


def audio_features(
    record: Mapping, settings: ProcessorSettings | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(log-mel features [frames, 128] float32, mask [frames] bool) of one clip.

    As `Gemma4AudioFeatureExtractor` on the clip alone: padded to a multiple
    of 128 samples, semicausal padding of half a frame, periodic Hann window,
    |rfft| through the HTK mel bank, log(x + 1e-3), masked frames zeroed.
    """
    settings = settings or settings_of(record)
    x = audio_samples(record, settings)[: settings.max_audio_samples]
    n = len(x)
    m = settings.pad_to_multiple_of
    padded = -(-n // m) * m
    wave_ = np.zeros(padded, np.float32)  # float32 throughout, as the extractor
    wave_[:n] = x
    real = np.zeros(padded, bool)
    real[:n] = True
    pad_left = settings.frame_length // 2
    wave_ = np.pad(wave_, (pad_left, 0))
    real = np.pad(real, (pad_left, 0))
    size = settings.frame_length + 1
    count = (len(wave_) - size) // settings.hop_length + 1
    starts = np.arange(max(count, 0)) * settings.hop_length
    frames = wave_[starts[:, None] + np.arange(settings.frame_length)[None, :]]
    window = np.hanning(settings.frame_length + 1)[:-1].astype(np.float32)
    spectrum = np.abs(np.fft.rfft(frames * window, n=settings.fft_length, axis=-1))
    log_mel = np.log(spectrum @ _mel_filters(settings) + np.float64(settings.mel_floor))
    mask = real[starts + size - 1]
    return (log_mel.astype(np.float32) * mask[:, None]), mask


# --------------------------------------------------------------------------
# Placeholder expansion
# --------------------------------------------------------------------------


def media_of(messages: Sequence[Mapping]) -> list[dict]:
    """The media records of `messages`, in the order the template writes them."""
    return [record for m in messages for record in m.get("media") or ()]


def expand(
    ids: np.ndarray,
    mask: np.ndarray,
    records: Sequence[Mapping],
    token_ids: Mapping[str, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Expands each placeholder id into begin marker + soft tokens + end marker.

    The k-th placeholder takes the k-th record; the expansion carries no
    loss (the model never writes media). `token_ids` maps every string of
    `TOKENS` to its id.

    Example (ids of the tiny tokenizer: <|image|>=108, <|image>=107, <image|>=109):
        ids     2  9  108        10
        ->      2  9  107 108 108 109  10     (a record with soft_tokens=2)
        mask    0  0  0   0   0   0    0
    """
    placeholders = {token_ids[PLACEHOLDER[k]]: k for k in KINDS}
    where = [i for i, t in enumerate(ids.tolist()) if t in placeholders]
    if len(where) != len(records):
        raise ValueError(
            f"{len(where)} media placeholders in the sequence but {len(records)} "
            "images/audio clips in its messages"
        )
    if not where:
        return ids, mask
    out_ids, out_mask, last = [], [], 0
    for i, record in zip(where, records):
        kind = placeholders[int(ids[i])]
        if record["type"] != kind:
            raise ValueError(
                f"placeholder {PLACEHOLDER[kind]} meets a {record['type']}"
            )
        n = int(record["soft_tokens"])
        run = [token_ids[BEGIN[kind]]] + [int(ids[i])] * n + [token_ids[END[kind]]]
        out_ids += [ids[last:i], np.asarray(run, ids.dtype)]
        out_mask += [mask[last:i], np.zeros(len(run), bool)]
        last = i + 1
    out_ids.append(ids[last:])
    out_mask.append(mask[last:])
    return np.concatenate(out_ids), np.concatenate(out_mask)
