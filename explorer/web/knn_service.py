"""clip-retrieval's /knn-service request, as its back end (clip_retrieval/clip_back.py, `KnnService.post`)
reads it, checked field by field so that a bad request is a 400 that names what is wrong.

The engine has two indices (`GET /indices-list`), each in its own embedding space, as each of
clip-back's indices has its own model:

    explorer         the distinct captions under MiniLM: `text`, or `embedding_input` (384 numbers);
                     both modalities search it (it is the only text-space index)
    explorer-image   every web image under a frozen ImageNet encoder (explorer/web/image_index.py):
                     `image` (base64 image file bytes, embedded by the engine's own model), `image_url`
                     (only this engine's own /image/KEY: it downloads nothing), or `embedding_input` (a
                     vector of that model); modality "image"

As in clip-back, the first of text, image / image_url, embedding_input that is given is the query;
`num_result_ids` neighbours (default `num_images`) are searched, `deduplicate` then drops near
duplicates, and the first `num_images` results carry url and caption, the rest only id and
similarity. Without `indice_name`, a text or vector query goes to `explorer`, an image to
`explorer-image`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

KNN_INDEX = "explorer"  # captions, in MiniLM's space
IMAGE_INDEX = "explorer-image"  # images, in the image model's space
KNN_MODALITIES = ("image", "text")
QUERY_FIELDS = "a non-empty 'text', an 'image', an 'image_url' or an 'embedding_input'"


@dataclass(frozen=True)
class KnnRequest:
    text: str | None
    image: bytes | None          # the decoded `image` field
    image_url: str | None
    embedding: np.ndarray | None
    modality: str
    indice_name: str
    num_images: int
    num_result_ids: int
    deduplicate: bool

    @property
    def is_image(self) -> bool:
        return self.image is not None or self.image_url is not None


def _count(req: dict, name: str, default) -> int:
    value = req.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"'{name}' should be an integer >= 0, got {value!r}")
    return value


def _query(req: dict) -> tuple[str | None, bytes | None, str | None, np.ndarray | None]:
    """(text, image, image_url, embedding): the first given, in clip-back's order; the others None."""
    text, image, url, embedding = (req.get(k) for k in ("text", "image", "image_url", "embedding_input"))
    if text not in (None, ""):
        if not isinstance(text, str):
            raise ValueError(f"'text' should be a string, got {type(text).__name__}")
        return text, None, None, None
    if image not in (None, ""):
        if not isinstance(image, str):
            raise ValueError(f"'image' should be a base64 string, got {type(image).__name__}")
        try:
            return None, base64.b64decode(image, validate=True), None, None
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"'image' is not valid base64: {e}") from e
    if url not in (None, ""):
        if not isinstance(url, str):
            raise ValueError(f"'image_url' should be a string, got {type(url).__name__}")
        return None, None, url, None
    if embedding is None:
        raise ValueError(f"need {QUERY_FIELDS}")
    if not isinstance(embedding, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in embedding):
        raise ValueError("'embedding_input' should be a list of numbers")
    return None, None, None, np.asarray(embedding, np.float32)


def knn_request(req, indices: tuple[str, ...] = (KNN_INDEX,)) -> KnnRequest:
    """A /knn-service body, checked against the engine's `indices`; ValueError names what is wrong."""
    if not isinstance(req, dict):
        raise ValueError(f"expected a JSON object, got {type(req).__name__}")  # noqa: TRY004  (a 400, as any bad field)
    text, image, url, embedding = _query(req)
    modality = req.get("modality", "image")
    if modality not in KNN_MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(KNN_MODALITIES)}")
    indice = req.get("indice_name")
    if indice is None:
        indice = IMAGE_INDEX if image is not None or url is not None else KNN_INDEX
    if indice == IMAGE_INDEX and indice not in indices:
        raise ValueError(f"this engine serves no image index ({IMAGE_INDEX!r}), so it cannot answer image queries: "
                         "`explorer serve` builds and serves one unless --no-image-index is given")
    if indice not in indices:
        raise ValueError(f"unknown indice_name {indice!r}; valid: {', '.join(indices)} (GET /indices-list)")
    num = _count(req, "num_images", 40)
    dedup = req.get("deduplicate", False)  # the real back end's default when the key is absent
    if not isinstance(dedup, bool):
        raise ValueError(f"'deduplicate' should be true or false, got {dedup!r}")  # noqa: TRY004
    return KnnRequest(text=text, image=image, image_url=url, embedding=embedding, modality=modality,
                      indice_name=indice, num_images=num, num_result_ids=_count(req, "num_result_ids", num),
                      deduplicate=dedup)
