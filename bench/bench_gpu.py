"""Learner throughput and utilisation on this machine's device, and where one loop iteration's time goes.

Run: python bench/bench_gpu.py                      # the GPU when there is one, else the CPU (small shapes)
     python bench/bench_gpu.py --device cpu --peak-tflops 1.2 --only moco-demo lm-demo loop
     torchrun is not needed: one device, one process.

Prints, and writes to bench/results/gpu/<device>/ (report.md, rows.csv / rows.json, machine.json):

- MoCo-v3 train images/s (images of the global batch per second of whole steps: two views, online
  forward and backward, momentum forward, optimizer) and embed images/s, at the demo's learner
  (configs/demo.yaml: EfficientNet-Lite0, 32 px, four stages frozen, batch 128) and at an
  Internet-Explorer-like shape (ResNet-50 from scratch, 224 px, batch 256);
- LM train tokens/s at the demo's LM (configs/text.yaml: `nano`, 128 tokens, batch 8) and at a
  ~100M-parameter LM (`large`, 512 tokens, batch 32);
- each one's model FLOPs per step (MoCo: counted by torch's FlopCounterMode over one step; LM:
  6 N D with N the non-embedding parameters, learners/flops.py) and the model FLOPs utilisation
  against the device's peak (bf16 dense for known GPUs; `--peak-tflops` for any other device);
- the time split of one loop iteration (search / fetch / reward / train / eval, the metrics row's
  `stage_seconds`) of the demo config on a 150-items-per-source slice of the installed web, served
  by the local engine over loopback HTTP.

On the CPU the IE-like shapes run at small batches (`--cpu-batch`, default 8 images / 2 sequences):
the report's shape column says which. Rates are the fastest of `--steps` timed steps after one
warm-up step (the least disturbed by other processes). bf16 autocast on CUDA (the learners' default),
fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import finish_report, write_rows  # noqa: E402
from explorer.run.config import load_config  # noqa: E402
from learners.flops import training_flops  # noqa: E402
from learners.lm import LMConfig, LMLearner, non_embedding_params  # noqa: E402
from learners.mixture import TrainingMixture  # noqa: E402
from learners.moco import MoCoConfig, MoCoLearner  # noqa: E402
from learners.text_data import PackedTextStream  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# bf16 dense tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by the device's name.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
         "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
STAGES = ("search", "fetch", "reward", "train", "eval")


def device_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest(work, steps: int, device: torch.device) -> float:
    work()  # warm-up: kernels, allocator, autocast caches
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def moco_shapes(device: torch.device, cpu_batch: int) -> dict[str, MoCoConfig]:
    demo = load_config(ROOT / "configs" / "demo.yaml").learner
    demo = dataclasses.replace(demo, total_steps=1000)
    ie = MoCoConfig(backbone="resnet50", backbone_kwargs={}, pretrained=None, image_size=224, frozen_stages=0,
                    batch_size=256 if device.type == "cuda" else cpu_batch, dim=256, mlp_dim=4096,
                    projector_layers=2, total_steps=1000, warmup_steps=10)
    return {"moco-demo": demo, "moco-ie": ie}


def bench_moco(name: str, cfg: MoCoConfig, device: torch.device, steps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(2 * cfg.batch_size, 64), 3, cfg.image_size, cfg.image_size),
                           dtype=torch.uint8, generator=generator)
    learner = MoCoLearner(cfg, device=device)
    mixture = TrainingMixture(images)
    learner.train_step(mixture)
    with FlopCounterMode(display=False) as counter:
        learner.train_step(mixture)
    flops = counter.get_total_flops()
    step = fastest(lambda: learner.train_step(mixture), steps, device)
    embed = fastest(lambda: learner.embed(images), 1, device)
    return {"bench": name, "shape": f"{cfg.backbone} {cfg.image_size}px batch {cfg.batch_size}"
            + (f", stages 0-{cfg.frozen_stages - 1} frozen" if cfg.frozen_stages else ""),
            "params_m": round(sum(p.numel() for p in learner.model.parameters()) / 1e6, 1),
            "step_s": round(step, 4), "rate": round(cfg.batch_size / step, 1), "unit": "train images/s",
            "embed_rate": round(len(images) / embed, 1), "flops_per_step": flops}


def lm_shapes(device: torch.device, cpu_batch: int) -> dict[str, LMConfig]:
    text = load_config(ROOT / "configs" / "text.yaml").text
    demo = LMConfig(size=text.lm_size, vocab_size=text.tokenizer_vocab, seq_len=text.seq_len,
                    batch_size=text.batch_size, warmup=10, total_steps=1000)
    big = LMConfig(size="large", vocab_size=32_000, seq_len=512 if device.type == "cuda" else 128,
                   batch_size=32 if device.type == "cuda" else cpu_batch, warmup=10, total_steps=1000)
    return {"lm-demo": demo, "lm-100m": big}


def bench_lm(name: str, cfg: LMConfig, device: torch.device, steps: int) -> dict:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, cfg.vocab_size, size=int(n)).tolist() for n in rng.integers(64, 2048, size=400)]
    stream = PackedTextStream(docs, seq_len=cfg.seq_len, eos_id=0, seed=0)
    learner = LMLearner(cfg, device=device)
    n = non_embedding_params(learner.model)
    tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    step = fastest(lambda: learner.train_step(stream), steps, device)
    return {"bench": name, "shape": f"{cfg.size} ({n / 1e6:.1f}M non-embedding), {cfg.seq_len} tokens x batch "
            f"{cfg.batch_size}", "params_m": round(n / 1e6, 1), "step_s": round(step, 4),
            "rate": round(tokens / step, 1), "unit": "train tokens/s", "embed_rate": None,
            "flops_per_step": training_flops(n, tokens)}


def bench_loop(device: torch.device, iterations: int) -> dict:
    """The demo config, 2 iterations on a slice of the installed web: the mean time split."""
    from explorer.run.experiment import local_engine_for
    from explorer.run.image import ImageLoop
    from explorer.web.corpus import CorpusSpec, build_corpus

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        corpus = build_corpus(Path(tmp) / "corpus", CorpusSpec(limit_per_source=150), progress=False)
        cfg = load_config(ROOT / "configs" / "demo.yaml", {"iterations": iterations, "corpus": str(corpus.root)})
        with local_engine_for(cfg) as url:
            loop = ImageLoop(cfg, Path(tmp) / "run", engine_url=url, progress=False)
            try:
                rows = loop.run(log=lambda _: None)[1:]
            finally:
                loop.close()
    split = {s: round(float(np.mean([r["stage_seconds"].get(s, 0.0) for r in rows])), 3) for s in STAGES}
    return {"bench": "loop", "shape": f"configs/demo.yaml, {cfg.train.steps_per_iteration} steps, "
            f"{cfg.policy.queries_per_iteration} queries x {cfg.search.results_per_query} results per iteration",
            "step_s": round(float(np.mean([r["seconds"] for r in rows])), 3), "unit": "s per iteration",
            **{f"{s}_s": v for s, v in split.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per learner (after one warm-up)")
    parser.add_argument("--cpu-batch", type=int, default=8, help="IE-like shapes' batch on the CPU (images)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the utilisation")
    parser.add_argument("--loop-iterations", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None,
                        help="moco-demo moco-ie lm-demo lm-100m loop (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/gpu/<device>")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    wanted = lambda name: args.only is None or name in args.only  # noqa: E731
    peak = device_peak(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or ROOT / "bench" / "results" / "gpu" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    rows = []
    for key, cfg in moco_shapes(device, args.cpu_batch).items():
        if wanted(key):
            rows.append(bench_moco(key, cfg, device, args.steps))
            print(rows[-1], flush=True)
    for key, cfg in lm_shapes(device, max(1, args.cpu_batch // 4)).items():
        if wanted(key):
            rows.append(bench_lm(key, cfg, device, args.steps))
            print(rows[-1], flush=True)
    for row in rows:
        row["tflops"] = round(row["flops_per_step"] / row["step_s"] / 1e12, 3)
        row["mfu"] = round(row["flops_per_step"] / row["step_s"] / peak, 4) if peak else None
    if wanted("loop"):
        rows.append(bench_loop(device, args.loop_iterations))
        print(rows[-1], flush=True)
    lines = [f"# Learner throughput and the loop's time split on {name}", "",
             f"Peak for the utilisation: {peak / 1e12:.0f} TFLOP/s" if peak else
             "Peak: unknown for this device (give --peak-tflops); no utilisation", "",
             "| bench | shape | step (s) | rate | embed images/s | model TFLOP/s | MFU |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["bench"] == "loop":
            continue
        embed = "" if r["embed_rate"] is None else f"{r['embed_rate']:,.0f}"
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['bench']} | {r['shape']} | {r['step_s']} | {r['rate']:,.0f} {r['unit']} | {embed} | "
                     f"{r['tflops']} | {mfu} |")
    loop = next((r for r in rows if r["bench"] == "loop"), None)
    if loop:
        lines += ["", f"One loop iteration ({loop['shape']}): {loop['step_s']} s", "",
                  "| " + " | ".join(STAGES) + " |", "|" + "---:|" * len(STAGES),
                  "| " + " | ".join(f"{loop[s + '_s']} s" for s in STAGES) + " |"]
    write_rows(out, "rows", rows)
    finish_report(out, lines, " ".join(["python bench/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
