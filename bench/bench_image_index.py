"""Building the engine's image index: images/s of the whole build, and of decoding and of the
encoder's forward apart, per hidden source (clip art is large PNGs; Fashion-MNIST and MNIST 28 px).

Run: python bench/bench_image_index.py [--corpus DIR] [--sample 1000] [--no-build]
Writes bench/results/image_index/image_index.json (+ machine.json). The full build also leaves the
index beside the corpus (image_emb.npy, image_index.json), where the engine then finds it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import write_machine

from explorer.web.corpus import WebCorpus, fashion_web_dir
from explorer.web.image_encoder import (
    DEFAULT_IMAGE_MODEL,
    ImageDecodeError,
    ImageEncoder,
    decode_image,
)
from explorer.web.image_index import build_image_index

OUT = Path(__file__).parent / "results" / "image_index"


def per_source(corpus: WebCorpus, encoder: ImageEncoder, sample: int) -> dict:
    """Decode and forward images/s on up to `sample` items of each hidden source."""
    rng, out = np.random.default_rng(0), {}
    for source in sorted(set(corpus.hidden["source"])):
        rows = np.flatnonzero(corpus.hidden["source"] == source)
        rows = np.sort(rng.choice(rows, min(sample, len(rows)), replace=False))
        t = time.perf_counter()
        pixels = []
        for i in rows:
            try:
                pixels.append(decode_image(corpus.image_bytes(int(i)), encoder.image_size))
            except ImageDecodeError:
                pass
        decode_s = time.perf_counter() - t
        batch = torch.stack(pixels)
        t = time.perf_counter()
        for start in range(0, len(batch), 256):
            encoder.encode(batch[start:start + 256])
        forward_s = time.perf_counter() - t
        out[source] = {"images": len(rows), "decode_img_per_s": round(len(rows) / decode_s, 1),
                       "forward_img_per_s": round(len(pixels) / forward_s, 1)}
        print(f"{source:14s} decode {out[source]['decode_img_per_s']:8.1f} img/s   "
              f"forward {out[source]['forward_img_per_s']:7.1f} img/s   ({len(rows)} images)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=fashion_web_dir())
    p.add_argument("--sample", type=int, default=1000, help="images per source for the decode / forward split")
    p.add_argument("--no-build", dest="build", action="store_false", help="only the per-source split")
    args = p.parse_args()
    corpus, encoder = WebCorpus(args.corpus), ImageEncoder(DEFAULT_IMAGE_MODEL)
    print(f"{DEFAULT_IMAGE_MODEL}, {torch.get_num_threads()} threads, corpus of {len(corpus)} images")
    result = {"model": DEFAULT_IMAGE_MODEL, "corpus_items": len(corpus), "per_source": per_source(corpus, encoder,
                                                                                                  args.sample)}
    if args.build:
        result["build"] = build_image_index(corpus, encoder, progress=True)
        print(f"whole build: {result['build']['items']} images in {result['build']['seconds']} s = "
              f"{result['build']['images_per_second']} img/s ({result['build']['skipped']} not readable)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "image_index.json").write_text(json.dumps(result, indent=1) + "\n")
    write_machine(OUT, "python bench/bench_image_index.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
