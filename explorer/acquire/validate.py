"""Validation of a downloaded candidate image, and its normalisation for the pipeline.

`validate_image` never raises: every body maps to a `ValidatedImage` or a `Rejection` whose status is
one of `STATUSES`. Checks run cheapest-first, and dimensions are read from the header before any
pixel is decoded, so a small file that claims 30000x30000 pixels costs nothing:

    empty -> too_large_body -> bad_content_type -> not_an_image / wrong_magic (sniffed magic bytes)
    -> decompression_bomb / too_large_dims / too_small (header only) -> decode_error (full decode)

`to_pipeline_tensor` (explorer/web/pixels.py, shared with the engine's image index) turns a decoded
image into the pipeline's uint8 (3, S, S) RGB: transparency is composited onto white, and
non-square images are scaled so the LONGER side is S and padded to a square with white.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from explorer.web.pixels import to_pipeline_tensor

if TYPE_CHECKING:  # torch is imported where tensors are made: importing the fetcher stays light
    import torch

# PIL warns on opening a header past its own pixel limit; `max_pixels` (below that limit) rejects
# such images before they are decoded, so the warning would only be noise in the logs.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Every status a candidate can end with; the fetcher adds the transport ones.
STATUSES = (
    "ok",
    "empty",  # zero-byte body
    "too_large_body",  # body (or its Content-Length) over the byte limit
    "bad_content_type",  # declared type is not an image (e.g. text/html)
    "not_an_image",  # the bytes start with no known image signature
    "wrong_magic",  # an image signature that contradicts the declared image type
    "too_small",  # shorter side below min_side
    "too_large_dims",  # longer side above max_side
    "decompression_bomb",  # header claims more than max_pixels (or PIL's own bomb limit)
    "decode_error",  # header fine, pixels undecodable (truncated, corrupt)
    "http_error",  # HTTP status >= 400, or a redirect without a usable Location
    "timeout",  # connect/read timeout or the per-request total deadline
    "network_error",  # refused, reset, DNS, too many redirects, malformed HTTP
    "blocked",  # refused by the fetcher's pre-request hook
)

# Magic-byte signatures -> PIL format name.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
# Declared image MIME types -> the format the bytes must then have.
_MIME_FORMATS = {
    "image/png": "PNG", "image/x-png": "PNG", "image/apng": "PNG",
    "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG",
    "image/gif": "GIF", "image/webp": "WEBP",
    "image/bmp": "BMP", "image/x-bmp": "BMP", "image/x-ms-bmp": "BMP",
}
# Types that say nothing about the content; the magic bytes decide.
_GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}


@dataclass(frozen=True)
class ValidatedImage:
    image: Image.Image  # fully decoded
    width: int
    height: int
    format: str  # PNG, JPEG, GIF, WEBP or BMP
    status: str = "ok"
    reason: str = ""

    @property
    def ok(self) -> bool:
        return True


@dataclass(frozen=True)
class Rejection:
    status: str  # one of STATUSES, never "ok"
    reason: str
    width: int | None = None  # known when the header could be read
    height: int | None = None

    def __post_init__(self):
        if self.status not in STATUSES or self.status == "ok":
            raise ValueError(f"unknown rejection status {self.status!r}; valid: {STATUSES[1:]}")

    @property
    def ok(self) -> bool:
        return False


def sniff_format(body: bytes) -> str | None:
    """The image format named by the body's magic bytes, or None."""
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _SIGNATURES:
        if body.startswith(magic):
            return fmt
    return None


def _check_type(body: bytes, content_type: str | None) -> Rejection | str:
    """The sniffed format, or why the declared type and the bytes disagree."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime not in _GENERIC_TYPES and not mime.startswith("image/"):
        return Rejection("bad_content_type", f"declared {mime!r}, not an image type")
    sniffed = sniff_format(body)
    if sniffed is None:
        return Rejection("not_an_image", f"no image signature in first bytes {body[:8]!r}")
    declared = _MIME_FORMATS.get(mime)
    if mime.startswith("image/") and declared != sniffed:
        return Rejection("wrong_magic", f"declared {mime!r} but bytes are {sniffed}")
    return sniffed


def _check_dims(w: int, h: int, min_side: int, max_side: int, max_pixels: int) -> Rejection | None:
    if w * h > max_pixels:
        return Rejection("decompression_bomb", f"header claims {w}x{h} > {max_pixels} pixels", w, h)
    if max(w, h) > max_side:
        return Rejection("too_large_dims", f"{w}x{h} has a side > {max_side}", w, h)
    if min(w, h) < min_side:
        return Rejection("too_small", f"{w}x{h} has a side < {min_side}", w, h)
    return None


def decode_cost(body: bytes, max_pixels: int) -> int:
    """Bytes that validating and normalising `body` may hold at once: 12 per pixel its header claims
    (the decoded image, its RGB(A) conversion and the decoder's buffers; a 4096x4096 RGB PNG was
    measured at ~11). 0 when nothing will be decoded: an unreadable header, or one past
    `max_pixels` (rejected from the header alone)."""
    try:
        w, h = Image.open(io.BytesIO(body)).size  # lazy: the header only
    except Exception:  # noqa: BLE001  (PIL raises many types on a broken header)
        return 0
    return 0 if w * h > max_pixels else 12 * w * h


def validate_image(
    body: bytes,
    content_type: str | None,
    *,
    min_side: int = 8,
    max_side: int = 4096,
    max_pixels: int = 4096 * 4096,
    max_bytes: int | None = None,
) -> ValidatedImage | Rejection:
    """Check a candidate cheapest-first; never raises (see the module docstring for the order)."""
    if not body:
        return Rejection("empty", "zero-byte body")
    if max_bytes is not None and len(body) > max_bytes:
        return Rejection("too_large_body", f"{len(body)} bytes > {max_bytes}")
    sniffed = _check_type(body, content_type)
    if isinstance(sniffed, Rejection):
        return sniffed
    try:  # lazy: reads the header only. PIL raises its own bomb error past 2 * MAX_IMAGE_PIXELS
        image = Image.open(io.BytesIO(body), formats=[sniffed])
        w, h = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # warning: -W error
        return Rejection("decompression_bomb", f"PIL: {e}")
    except Exception as e:  # noqa: BLE001  (PIL raises many types on a broken header)
        return Rejection("decode_error", f"header: {type(e).__name__}: {e}")
    bad_dims = _check_dims(w, h, min_side, max_side, max_pixels)
    if bad_dims is not None:
        return bad_dims
    try:
        image.load()
    except Image.DecompressionBombError as e:
        return Rejection("decompression_bomb", f"PIL: {e}", w, h)
    except Exception as e:  # noqa: BLE001
        return Rejection("decode_error", f"{type(e).__name__}: {e}", w, h)
    return ValidatedImage(image=image, width=w, height=h, format=sniffed)


def decode_batch(
    bodies: list[bytes], size: int = 32, content_types: list[str | None] | None = None, **limits
) -> tuple[torch.Tensor, list[ValidatedImage | Rejection]]:
    """Validate and normalise many bodies: uint8 (K, 3, size, size) for the K that passed, in order,
    and one result per body (so `[i for i, r in enumerate(results) if r.ok]` indexes the rows)."""
    import torch

    content_types = content_types or [None] * len(bodies)
    results = [validate_image(b, t, **limits) for b, t in zip(bodies, content_types, strict=True)]
    rows = [to_pipeline_tensor(r.image, size) for r in results if r.ok]
    images = torch.stack(rows) if rows else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return images, results
