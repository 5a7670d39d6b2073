import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from explorer.acquire.validate import (
    STATUSES,
    Rejection,
    decode_batch,
    sniff_format,
    to_pipeline_tensor,
    validate_image,
)
from tests.explorer.acquire.fault_server import (
    clipart_pngs,
    fashion_images,
    header_bomb_png,
    html_page,
    jpeg_bytes,
    png_bytes,
)


@pytest.fixture(scope="module")
def fashion_png() -> bytes:
    return png_bytes(fashion_images(1)[0])


@pytest.fixture(scope="module")
def clipart_png() -> bytes:
    return clipart_pngs(1)[0]


def test_real_fashion_png_decodes_to_its_pixels(fashion_png):
    result = validate_image(fashion_png, "image/png")
    assert result.ok and result.status == "ok"
    assert (result.width, result.height, result.format) == (28, 28, "PNG")
    tensor = to_pipeline_tensor(result.image, size=28)  # square, same size: no resampling
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 28, 28)
    original = torch.from_numpy(fashion_images(1)[0].copy())
    for channel in tensor:  # greyscale -> three identical channels
        assert torch.equal(channel, original)


def test_fashion_resized_to_32_keeps_the_garment(fashion_png):
    tensor = to_pipeline_tensor(validate_image(fashion_png, "image/png").image, size=32)
    assert tensor.shape == (3, 32, 32)
    back = torch.nn.functional.interpolate(tensor[None, :1].float(), size=28, mode="bilinear")
    corr = np.corrcoef(back.flatten().numpy(), fashion_images(1)[0].flatten())[0, 1]
    assert corr > 0.95


def test_real_clipart_is_composited_on_white_and_padded(clipart_png):
    result = validate_image(clipart_png, "image/png")
    assert result.ok and result.image.mode == "RGBA"
    w, h = result.width, result.height
    assert w != h  # this file is non-square, so padding is exercised
    tensor = to_pipeline_tensor(result.image, size=32)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8
    pad = (32 - round(min(w, h) * 32 / max(w, h))) // 2
    border = tensor[:, :, :pad] if w < h else tensor[:, :pad, :]
    assert pad >= 2 and bool((border == 255).all())  # padding is white
    assert tensor.float().mean() < 250  # the drawing itself survived


def test_transparent_pixels_become_white():
    rgba = np.zeros((20, 20, 4), np.uint8)  # black, fully transparent
    rgba[5:15, 5:15] = (200, 0, 0, 255)  # an opaque red square
    tensor = to_pipeline_tensor(Image.fromarray(rgba, "RGBA"), size=20)
    assert bool((tensor[:, 0, 0] == 255).all())
    assert tensor[:, 10, 10].tolist() == [200, 0, 0]
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert bool((to_pipeline_tensor(la, size=20)[:, 0, 0] == 255).all())


def test_palette_transparency_and_16bit_grey():
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((5, 5), 1)
    palette.info["transparency"] = 0
    tensor = to_pipeline_tensor(Image.open(io.BytesIO(png_bytes(palette))), size=10)
    assert tensor[:, 0, 0].tolist() == [255, 255, 255] and tensor[:, 5, 5].tolist() == [0, 255, 0]
    grey16 = Image.fromarray(np.full((10, 10), 65535, np.uint16))
    decoded = validate_image(png_bytes(grey16), "image/png")
    assert decoded.ok
    assert bool((to_pipeline_tensor(decoded.image, size=10) == 255).all())  # scaled, not clipped


def _bodies() -> dict[str, tuple[bytes, str | None, dict]]:
    fashion = fashion_images(1)[0]
    png = png_bytes(fashion)
    return {
        "empty": (b"", "image/png", {}),
        "too_large_body": (png, "image/png", {"max_bytes": 100}),
        "bad_content_type": (html_page(), "text/html; charset=utf-8", {}),
        "not_an_image": (html_page(), "image/png", {}),
        "wrong_magic": (jpeg_bytes(fashion), "image/png", {}),
        "too_small": (png_bytes(np.zeros((4, 4), np.uint8)), "image/png", {}),
        "too_large_dims": (png_bytes(np.zeros((10, 5000), np.uint8)), "image/png", {}),
        "decompression_bomb": (header_bomb_png(30000, 30000), "image/png", {}),
        "decode_error": (png[: len(png) // 2], "image/png", {}),
    }


@pytest.mark.parametrize("status", list(_bodies()))
def test_each_rejection_class(status):
    body, content_type, limits = _bodies()[status]
    result = validate_image(body, content_type, **limits)
    assert isinstance(result, Rejection) and not result.ok
    assert result.status == status, result.reason


def test_bomb_is_caught_by_our_limit_before_pils():
    result = validate_image(header_bomb_png(5000, 5000), "image/png")  # 25 Mpx < PIL's 89 Mpx
    assert result.status == "decompression_bomb" and (result.width, result.height) == (5000, 5000)
    assert validate_image(header_bomb_png(600, 600), "image/png", max_pixels=1000).status == \
        "decompression_bomb"


@pytest.mark.parametrize("content_type", [None, "", "application/octet-stream", "IMAGE/PNG; q=1"])
def test_generic_or_odd_case_content_type_defers_to_magic(fashion_png, content_type):
    assert validate_image(fashion_png, content_type).ok


def test_other_formats_sniffed_and_decoded():
    grey = fashion_images(1)[0]
    for fmt, mime in [("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp"),
                      ("BMP", "image/bmp")]:
        buffer = io.BytesIO()
        Image.fromarray(grey).convert("RGB").save(buffer, format=fmt)
        body = buffer.getvalue()
        assert sniff_format(body) == fmt
        result = validate_image(body, mime)
        assert result.ok and result.format == fmt, result


def test_validator_never_raises_on_mangled_bodies(fashion_png, clipart_png):
    rng = random.Random(0)
    seeds = [fashion_png, clipart_png, jpeg_bytes(fashion_images(1)[0]), header_bomb_png(64, 64)]
    seen = set()
    for _ in range(300):
        body = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        if rng.random() < 0.5:
            body = body[: rng.randrange(len(body) + 1)]
        result = validate_image(bytes(body), rng.choice(["image/png", "image/jpeg", None]))
        assert result.status in STATUSES
        seen.add(result.status)
    assert "decode_error" in seen and "ok" in seen  # the mangling exercised both outcomes


def test_decode_batch_keeps_order_and_skips_rejections(fashion_png, clipart_png):
    bodies = [fashion_png, b"", clipart_png, html_page()]
    images, results = decode_batch(bodies, size=16)
    assert [r.status for r in results] == ["ok", "empty", "ok", "not_an_image"]
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images[1], to_pipeline_tensor(results[2].image, 16))


def test_unknown_rejection_status_is_refused():
    with pytest.raises(ValueError, match="valid"):
        Rejection("bogus", "")
