"""Images in, tensors out: the one decoding and preprocessing path that training, ``eval`` and the
server share, so that they compute the same predictions for the same file.

:func:`decode_image` turns encoded bytes (JPEG, PNG, WebP, BMP, GIF, TIFF) into an RGB PIL image:
EXIF orientation applied, the first frame of an animation, grey/palette/CMYK/16-bit/alpha images
converted to 8-bit RGB, and a pixel-count bound checked from the header before any pixel is
decoded (decompression bombs). :class:`Preprocessing` is torchvision's ``ImageClassification``
transform as a value: resize the shorter side, center crop, scale to [0, 1], normalise.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import InterpolationMode

from .errors import ImageDecodeError, ImageTooLargeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "decode_image",
    "open_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 40_000_000  # about 7,700 x 5,200; larger photos are refused
# The formats served; Pillow's other decoders (PCX, TGA, ICO, PSD, SGI, EPS, ...) are never asked,
# so a rarely used and rarely hardened parser is not an attack surface of the server.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


RESIZE_MODES = ("shorter", "squash")
# torchvision's InterpolationMode names -> PIL's filters (what TF.resize passes PIL for these modes)
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# The filters whose crop is resampled alone (Preprocessing._resized): no negative lobes, so the
# order of PIL's two passes changes a pixel by a rounding at most
_CROP_ONLY = (Image.Resampling.BILINEAR, Image.Resampling.HAMMING)


@dataclass(frozen=True)
class Preprocessing:
    """Resize (shorter side), center crop, scale to [0, 1], normalise.

    ``resize_mode="squash"`` resizes straight to ``crop_size`` x ``crop_size`` ignoring the aspect
    ratio, with no crop: what the Piggyback authors' loaders do for CUBS and Stanford Cars, where a
    center crop would cut off the bird or the car."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize_mode: str = "shorter"

    def __post_init__(self) -> None:
        if not 0 < self.crop_size <= self.resize_size:
            raise ValueError(f"need 0 < crop_size <= resize_size, got {self.crop_size} and {self.resize_size}")
        InterpolationMode(self.interpolation)  # raises ValueError naming the bad mode
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; use {' or '.join(RESIZE_MODES)}")

    @property
    def decode_min_side(self) -> int:
        """The shorter side a reduced JPEG decode must keep (see :func:`decode_image`)."""
        return self.crop_size if self.resize_mode == "squash" else self.resize_size

    @classmethod
    def from_torchvision(cls, transform: Any) -> Preprocessing:
        return cls(
            resize_size=int(transform.resize_size[0]),
            crop_size=int(transform.crop_size[0]),
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            interpolation=InterpolationMode(transform.interpolation).value,
        )

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Preprocessing:
        return cls(
            resize_size=int(value["resize_size"]),
            crop_size=int(value["crop_size"]),
            mean=tuple(float(v) for v in value["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in value["std"]),  # type: ignore[arg-type]
            interpolation=str(value["interpolation"]),
            resize_mode=str(value.get("resize_mode", "shorter")),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.resize_mode == "shorter":  # the default: task files stay as they were before the option
            del out["resize_mode"]
        return out

    def to_uint8(self, image: Image.Image) -> Tensor:
        """The resized and cropped image as ``uint8 [3, crop, crop]``, not normalised: what a
        server copies to the device (a quarter of float32's bytes), where
        :class:`~piggyback_core.Engine` normalises it with :attr:`mean` and :attr:`std` exactly as
        :meth:`__call__` does on the host. No torch operator runs here."""
        arr = np.asarray(self._resized(image), dtype=np.uint8)  # HWC
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def _resized(self, image: Image.Image) -> Image.Image:
        """torchvision's ``resize`` then ``center_crop``, resampling only the pixels the crop keeps.

        Each output pixel is sampled at the same source position with the same filter support as
        in the full resize (PIL's ``box`` names the crop in source coordinates): 0.52 ms instead
        of 0.90 for a 500x375 photo. PIL orders its two passes by their cost, which differs
        between the crop and the whole image, so the uint8 rounding between the passes may differ:
        the pixels equal torchvision's within 2 of 255 (a test bounds them). Training, ``eval`` and
        serving all come here, so they see the same pixels."""
        crop = self.crop_size
        if self.resize_mode == "squash":
            return image.resize((crop, crop), _PIL_RESAMPLE[self.interpolation])
        width, height = image.size
        # torchvision's sizes: the shorter side to resize_size, the longer one truncated
        if width <= height:
            new_w, new_h = self.resize_size, int(self.resize_size * height / width)
        else:
            new_w, new_h = int(self.resize_size * width / height), self.resize_size
        left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
        resample = _PIL_RESAMPLE[self.interpolation]
        if resample not in _CROP_ONLY:
            # Nearest has no support to keep; bicubic and Lanczos have negative lobes, so the uint8
            # rounding between the passes differs with their order (PIL picks it by cost): these
            # resize the whole image, as torchvision does, and equal it bit for bit.
            return image.resize((new_w, new_h), resample).crop((left, top, left + crop, top + crop))
        sx, sy = width / new_w, height / new_h
        return image.resize((crop, crop), resample, box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))

    def __call__(self, image: Image.Image) -> Tensor:
        """A ``float32 [3, crop, crop]`` tensor from an RGB PIL image.

        Resizing and cropping run in PIL, the arithmetic in numpy: no torch operator runs here, so
        decoding threads never touch torch's OpenMP pool (a second thread using it slows every
        later forward pass of the thread that runs the model). Same results as torchvision's
        ``resize``/``center_crop``/``pil_to_tensor``/``normalize``, which a test checks."""
        arr = np.asarray(self._resized(image), dtype=np.float32)  # HWC, 0..255
        arr = arr / np.float32(255.0)
        arr -= np.asarray(self.mean, dtype=np.float32)
        arr /= np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA", "LA") or (img.mode == "RGBA"):
        img = img.convert("RGBA").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_min_side: int | None = None
) -> Image.Image:
    """Decode encoded image bytes into an RGB image; ImageDecodeError / ImageTooLargeError if not.

    ``draft_min_side``: a JPEG whose shorter side is at least twice this is decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (Pillow's ``draft``), keeping the shorter side at least this long:
    a 12-megapixel photo then costs a fraction of a full decode, and the resize that follows has
    less to do. Serving, ``eval`` and training all pass it (the test-time resize size, or what the
    training crop needs), so they see the same pixels."""
    if not data:
        raise ImageDecodeError("empty body: no image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(pixels=width * height, limit=max_pixels)
            if img.format == "PNG":
                # PIL decodes a PNG whose end was cut off (no IEND) without complaint; its verify()
                # walks every chunk's CRC to IEND. A truncated or corrupted file is refused.
                with Image.open(io.BytesIO(data), formats=("PNG",)) as check:
                    check.verify()
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if draft_min_side and img.format == "JPEG" and min(width, height) >= 2 * draft_min_side:
                scale = draft_min_side / min(width, height)
                img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except ImageTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(pixels=-1, limit=max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:  # PIL's ways of saying "corrupt"
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc


def open_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_min_side: int | None = None
) -> Image.Image:
    return decode_image(Path(path).read_bytes(), max_pixels=max_pixels, draft_min_side=draft_min_side)
