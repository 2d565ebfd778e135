import io

import numpy as np
import pytest
import torch
from PIL import Image

from piggyback_core import ImageDecodeError, ImageTooLargeError, Preprocessing, decode_image


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def test_exif_orientation_is_honoured() -> None:
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 60)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (8, 6), 128),
        lambda: Image.new("P", (8, 6), 3),
        lambda: Image.new("RGBA", (8, 6), (1, 2, 3, 0)),
        lambda: Image.new("LA", (8, 6), (9, 255)),
        lambda: Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16)),
        lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)),
        lambda: Image.new("1", (8, 6), 1),
    ],
)
def test_every_mode_becomes_8_bit_rgb(make) -> None:  # type: ignore[no-untyped-def]
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "TIFF" if img.mode == "I;16" else "PNG"
    decoded = decode_image(encode(img, fmt))
    assert decoded.mode == "RGB" and decoded.size == (8, 6)
    if img.mode == "I;16":
        assert np.asarray(decoded).min() == 255  # full-scale 16-bit white stays white


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).getpixel((5, 5))[0] > 200


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = encode(Image.new("1", (5000, 5000)), "PNG")  # tiny file, 25 Mpx
    with pytest.raises(ImageTooLargeError, match="25,000,000 pixels"):
        decode_image(bomb, max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"GIF89a", b"%PDF-1.7\n...", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_garbage_and_truncated_images_are_decode_errors(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_a_truncated_jpeg_is_a_decode_error() -> None:
    data = encode(Image.new("RGB", (64, 64), (5, 6, 7)), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_preprocessing_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        Preprocessing(resize_size=32, crop_size=64)


@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos", "nearest"])
@pytest.mark.parametrize("size", [(500, 375), (31, 97), (224, 224)])
def test_preprocessing_equals_torchvision_transforms_bit_for_bit(size: tuple[int, int], interpolation: str) -> None:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from piggyback_core import Preprocessing

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pre = Preprocessing(interpolation=interpolation)
    mode = InterpolationMode(interpolation)
    resized = TF.center_crop(TF.resize(img, [256], mode, antialias=True), [224])
    expected = TF.normalize(TF.pil_to_tensor(resized).to(torch.float32).div_(255.0), list(pre.mean), list(pre.std))
    got = pre(img)
    assert got.is_contiguous() and got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "hamming"])
@pytest.mark.parametrize("resize_crop", [(256, 224), (232, 224), (224, 224)])
def test_bilinear_resamples_only_the_crop_within_one_level_of_torchvision(
    interpolation: str, resize_crop: tuple[int, int]
) -> None:
    """Bilinear (and Hamming) resample only the crop; PIL orders its two passes by their cost,
    which differs between the crop and the whole image, so the uint8 rounding between the passes
    may differ by a level (on up to a third of the values: noise below bf16's input rounding)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from piggyback_core import Preprocessing

    rng = np.random.default_rng(1)
    pre = Preprocessing(resize_size=resize_crop[0], crop_size=resize_crop[1], interpolation=interpolation)
    sizes = [(500, 375), (375, 500), (31, 97), (224, 224), (1, 900), (1920, 1080), (4000, 3000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 1500, 2)) for _ in range(12)]
    for i, size in enumerate(sizes):
        img = photo_like(*size, seed=i) if min(size) >= 64 else Image.fromarray(
            rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        )  # fmt: skip
        full = TF.resize(img, [resize_crop[0]], InterpolationMode(interpolation), antialias=True)
        expected = np.asarray(TF.center_crop(full, [resize_crop[1]]), dtype=np.int16)
        got = np.asarray(pre._resized(img), dtype=np.int16)
        assert got.shape == expected.shape, size
        diff = np.abs(got - expected)
        assert diff.max() <= 2, (size, int(diff.max()))
        if min(size) >= resize_crop[0]:  # downscaling photos, what a server mostly sees: one level at most
            assert diff.max() <= 1 and diff.mean() < 0.35, (size, float(diff.mean()))


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shapes and texture, so that a JPEG of it is as hard to decode as a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "size,expected",
    [((4000, 3000), (500, 375)), ((1920, 1080), (480, 270)), ((1000, 750), (500, 375)), ((500, 375), (500, 375))],
)
def test_large_jpegs_are_decoded_at_a_reduced_scale_keeping_the_resize_size(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    data = encode(photo_like(*size), "JPEG", quality=90)
    assert decode_image(data).size == size
    assert decode_image(data, draft_min_side=256).size == expected  # shorter side stays >= 256


def test_a_reduced_decode_preprocesses_to_nearly_the_same_tensor() -> None:
    pre = Preprocessing()
    data = encode(photo_like(2400, 1800), "JPEG", quality=90)
    full, reduced = pre(decode_image(data)), pre(decode_image(data, draft_min_side=pre.resize_size))
    assert (full - reduced).abs().mean().item() < 0.05  # in normalised units (about 3 grey levels of 255)


def test_draft_applies_to_jpeg_only() -> None:
    data = encode(photo_like(1200, 900), "PNG")
    assert decode_image(data, draft_min_side=256).size == (1200, 900)


def test_eval_datasets_decode_as_the_server_does(tmp_path) -> None:  # noqa: ANN001
    from piggyback_core.data import ImageFolderDataset

    pre = Preprocessing(resize_size=128, crop_size=112)
    (tmp_path / "a").mkdir()
    data = encode(photo_like(1600, 1200), "JPEG", quality=90)
    (tmp_path / "a" / "x.jpg").write_bytes(data)
    served = pre(decode_image(data, draft_min_side=pre.resize_size))  # what server/app.py computes
    assert torch.equal(ImageFolderDataset(tmp_path, pre)[0][0], served)


def test_squash_resizes_to_the_crop_ignoring_the_aspect_ratio_and_keeps_the_whole_image() -> None:
    wide = np.zeros((50, 200, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)  # a red strip at the left edge: a center crop would cut it off
    squash = Preprocessing(resize_size=64, crop_size=32, resize_mode="squash")(Image.fromarray(wide))
    center = Preprocessing(resize_size=64, crop_size=32)(Image.fromarray(wide))
    assert squash.shape == center.shape == (3, 32, 32)
    assert squash[0, :, 0].mean() > 1.0 > center[0, :, 0].mean()  # red kept by squash only
    assert Preprocessing.from_dict(Preprocessing(resize_mode="squash").to_dict()).resize_mode == "squash"
    assert "resize_mode" not in Preprocessing().to_dict()  # default files are unchanged
    with pytest.raises(ValueError, match="resize mode"):
        Preprocessing(resize_mode="stretch")


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "SGI", "ICO"])
def test_formats_pillow_knows_but_the_server_does_not_list_are_never_decoded(fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format=fmt)
    assert Image.open(io.BytesIO(buf.getvalue())).format == fmt  # Pillow itself would decode it
    with pytest.raises(ImageDecodeError, match="supported format"):
        decode_image(buf.getvalue())
