"""The runtime layer both packages share: how a model is run, prepared, validated, and how
results reach the disk and the terminal.

Every way into `gimlens` and `circuits` goes through these few pieces, so each mechanism
exists once:

- [`run_hooked`][gimlens.runtime.run_hooked]: one forward pass with temporary hooks (removed
  afterwards, also on error), the bridge's norm-rebuild warning filtered;
- [`prepared`][gimlens.runtime.prepared]: eval mode and frozen parameters for the duration,
  restored exactly on exit (success or exception);
- [`require_lens_model`][gimlens.runtime.require_lens_model] and
  [`check_tokens`][gimlens.runtime.check_tokens]: validation at the boundary, raising
  [`GimlensError`][gimlens.errors.GimlensError];
- [`coerce_enum`][gimlens.validation.coerce_enum] (from [`gimlens.validation`][gimlens.validation]):
  a member or its value, or a clear error;
- [`check_writable`][gimlens.runtime.check_writable] and
  [`check_device`][gimlens.runtime.check_device]: an output path or a device refused before any
  work starts;
- [`atomic_write`][gimlens.runtime.atomic_write]: the old file or the complete new one, never a
  part; permissions follow the umask; the folder must exist; [`read_text`][gimlens.runtime.read_text]
  reads one back;
- [`progress`][gimlens.runtime.progress]: one tqdm bar, shown on the main process only;
- [`parse_bytes`][gimlens.runtime.parse_bytes], [`format_bytes`][gimlens.runtime.format_bytes]
  and [`available_memory`][gimlens.runtime.available_memory] for memory budgets.

Examples:
    >>> import torch
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> with prepared(model):
    ...     logits = run_hooked(model, torch.tensor([[1, 2, 3]]))
    >>> tuple(logits.shape[:2]), model.training
    ((1, 3), False)
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import GimlensError
from .validation import coerce_enum  # noqa: F401  (the old import path; the helper lives in validation)

__all__ = [
    "NORM_REBUILD_WARNING",
    "atomic_write",
    "available_memory",
    "check_device",
    "check_tokens",
    "check_writable",
    "format_bytes",
    "is_lens_model",
    "parse_bytes",
    "prepared",
    "progress",
    "read_text",
    "quiet_norm_rebuild",
    "require_lens_model",
    "run_hooked",
]

#: The warning a ``TransformerBridge`` gives when a hook on an RMSNorm's ``hook_scale`` /
#: ``hook_normalized`` makes it recompute the norm in Python (rounding-level differences).
NORM_REBUILD_WARNING = r"A forward hook edited hook_scale/hook_normalized"

Hook = tuple[str, Callable]


# ------------------------------------------------------------------------------------- the model


def list_names(names: Sequence[str], limit: int = 8) -> str:
    """`names` joined for an error message, the first `limit` of them and the count of the rest.

    Examples:
        >>> list_names(["a", "b", "c"], limit=2)
        'a, b, ... (3 in all)'
    """
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def is_lens_model(model: Any) -> bool:
    """Whether `model` is a TransformerLens model (`TransformerBridge` or
    `HookedTransformer`): it has hook points, a config and the `hooks` context."""
    return hasattr(model, "hook_dict") and hasattr(model, "cfg") and hasattr(model, "hooks")


def _outer_components(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The TransformerLens bridge components that wrapping put into `module`, outermost only."""
    try:
        from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    except ImportError:  # pragma: no cover - a TransformerLens without the bridge
        return []
    found, todo = [], list(module.children())
    while todo:
        child = todo.pop()
        if isinstance(child, GeneralizedComponent):
            found.append(child)
        else:
            todo.extend(child.children())
    return found


def _is_current(bridge, outer: list[torch.nn.Module]) -> bool:
    own = {id(m) for m in bridge.modules()}
    return bool(outer) and all(id(c) in own for c in outer)


def check_current(model) -> None:
    """Raise [`GimlensError`][gimlens.errors.GimlensError] if `model` is a stale bridge.

    A `TransformerBridge` goes stale when its HF model is wrapped again by TransformerLens:
    the new bridge's components replace its own inside the HF model, so its logits stay right
    while its hooks, and everything built on them, silently stop running. HookedTransformers
    and other models pass.

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> check_current(tiny_model("gpt2"))
    """
    hf = getattr(model, "original_model", None)
    if not isinstance(hf, torch.nn.Module) or _is_current(model, _outer_components(hf)):
        return
    raise GimlensError(
        f"this TransformerBridge is stale: its {type(hf).__name__} was wrapped in another "
        "TransformerBridge after it, which replaced its components, so its hooks (GIM, edge "
        "scores, patching) would no longer run; use the newest bridge, or load the model afresh"
    )


def require_lens_model(model: Any) -> None:
    """Raise [`GimlensError`][gimlens.errors.GimlensError] unless `model` is a TransformerLens
    model whose hooks run (not a bridge gone stale by a second wrap of its HF model)."""
    if not is_lens_model(model):
        raise GimlensError(
            "expected a TransformerLens model (TransformerBridge or HookedTransformer), got "
            f"{type(model).__name__}"
        )
    check_current(model)


@contextlib.contextmanager
def quiet_norm_rebuild() -> Iterator[None]:
    """Silence [`NORM_REBUILD_WARNING`][gimlens.runtime.NORM_REBUILD_WARNING] for the duration."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NORM_REBUILD_WARNING)
        yield


def run_hooked(
    model: Any,
    tokens: Tensor,
    *,
    fwd_hooks: Sequence[Hook] = (),
    bwd_hooks: Sequence[Hook] = (),
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """`model(tokens)` with temporary hooks in place -> logits.

    The hooks are removed when the pass returns or fails (a backward hook registered during the
    pass still fires when the caller runs backward later). `attention_mask` is passed on only
    when given.

    Args:
        model: a TransformerLens model.
        tokens: `[batch, pos]` token ids (or whatever the model's forward takes).
        fwd_hooks, bwd_hooks: `(hook name, fn(tensor, *, hook))` pairs.
        attention_mask: optional `[batch, pos]` mask, 1 for real tokens.
        **kwargs: further keyword arguments of the model's forward.

    Examples:
        >>> import torch
        >>> from gimlens.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> seen = []
        >>> _ = run_hooked(model, torch.tensor([[1, 2]]), fwd_hooks=[("hook_embed", lambda t, hook: seen.append(t.shape))])
        >>> seen
        [torch.Size([1, 2, 32])]
    """
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    with quiet_norm_rebuild(), model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks)):
        return model(tokens, **kwargs)


@contextlib.contextmanager
def prepared(model: Any) -> Iterator[Any]:
    """Eval mode and frozen parameters for the duration; every module's mode and every
    parameter's `requires_grad` restored exactly on exit, also after an exception.

    Dropout is off inside, so scores do not change from call to call on a model left in train
    mode. Nested use is fine.

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> model = tiny_model("gpt2").train()
        >>> with prepared(model):
        ...     any(p.requires_grad for p in model.parameters()), model.training
        (False, False)
        >>> model.training
        True
    """
    if is_lens_model(model):  # a stale bridge must not compute silently
        check_current(model)
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        for m, training in modes:
            m.training = training


# ------------------------------------------------------------------------------------ validation


def check_tokens(tokens: Any, model: Any, name: str = "input_ids", *, allow_1d: bool = True
                 ) -> Int[Tensor, "batch pos"]:
    """Validate integer token ids against the model's vocabulary; 1-D becomes a batch of one
    (unless `allow_1d` is False).

    Examples:
        >>> import torch
        >>> from gimlens.testing import tiny_model
        >>> check_tokens(torch.tensor([1, 2]), tiny_model("gpt2")).shape
        torch.Size([1, 2])
    """
    if not isinstance(tokens, Tensor):
        raise GimlensError(f"{name} must be an integer torch.Tensor [batch, pos], got "
                           f"{type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise GimlensError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim == 1 and allow_1d:
        tokens = tokens.unsqueeze(0)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise GimlensError(f"{name} must have shape [batch, pos] with batch, pos >= 1, got "
                           f"{tuple(tokens.shape)}")
    vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (vocab is not None and high >= int(vocab)):
        raise GimlensError(f"{name} holds ids outside the vocabulary [0, {vocab}): min {low}, "
                           f"max {high}")
    return tokens.long()


# ------------------------------------------------------------------------------------- the disk


def check_writable(path: str | os.PathLike, what: str = "output", *, probe: bool = True) -> Path:
    """`path` as a `Path`, after checking that a file can be written there.

    The one check every command and `save` uses before any work: `path` is not a folder, its
    folder exists (and is a folder, not a file), and, with `probe`, a file can be created in
    that folder (a temporary file is made and removed: this also holds for root and read-only
    file systems, where permission bits say nothing). Raises
    [`GimlensError`][gimlens.errors.GimlensError] naming `what` and the path.

    Examples:
        >>> import os, tempfile
        >>> check_writable(os.path.join(tempfile.mkdtemp(), "out.json")).suffix
        '.json'
        >>> check_writable("/no/such/folder/out.json", "-o")
        Traceback (most recent call last):
        ...
        gimlens.errors.GimlensError: the folder '/no/such/folder' of -o path '/no/such/folder/out.json' does not exist; create it first
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise GimlensError(f"{what} path {str(p)!r} is a folder; expected a file name")
    folder = p.parent if str(p.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise GimlensError(f"{what} path {str(p)!r} cannot be written: {str(folder)!r} is a file, "
                           "not a folder")
    if not folder.is_dir():
        raise GimlensError(f"the folder {str(folder)!r} of {what} path {str(p)!r} does not exist; "
                           "create it first")
    if probe:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=folder)
        except OSError as err:
            raise GimlensError(f"{what} path {str(p)!r} cannot be written: the folder "
                               f"{str(folder)!r} is not writable ({err.strerror})") from None
        os.close(fd)
        os.unlink(tmp)
    return p


def check_device(device: str | torch.device | None, what: str = "--device") -> torch.device | None:
    """`device` as a `torch.device` after checking that this build of PyTorch has it (`None` stays
    `None`: the caller's default).

    Raises [`GimlensError`][gimlens.errors.GimlensError] naming `what` for a name torch does not
    know (`"bogus"`) and for a device this machine lacks (`"cuda"` on a CPU build, `"cuda:3"`
    with two GPUs, `"mps"` off Apple silicon).

    Examples:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("bogus")
        Traceback (most recent call last):
        ...
        gimlens.errors.GimlensError: --device 'bogus' is not a torch device; expected e.g. cpu, cuda, cuda:1 or mps
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise GimlensError(f"{what} {device!r} is not a torch device; expected e.g. cpu, cuda, "
                           "cuda:1 or mps") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    available = bool(backend is not None and getattr(backend, "is_available", lambda: False)())
    if not available:
        raise GimlensError(f"{what} {str(device)!r}: this PyTorch build or machine has no {dev.type} "
                           "device; use --device cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise GimlensError(f"{what} {str(device)!r}: this machine has {count()} {dev.type} "
                           f"device(s), numbered from 0")
    return dev


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write `data` (bytes, text as UTF-8, or a function writing to a binary file object) to
    `path` through a temporary file in the same folder and one rename.

    A reader sees the old file or the complete new one; on any error the temporary file is
    removed and `path` is left as it was. The file gets the permissions `open()` would give
    (`0o666` less the umask). The folder must exist. A path that cannot be written (a missing
    or read-only folder, a full disk) is a [`GimlensError`][gimlens.errors.GimlensError] naming
    it, never a raw `OSError`.

    Examples:
        >>> import os, tempfile
        >>> p = atomic_write(os.path.join(tempfile.mkdtemp(), "a.txt"), "hello")
        >>> p.read_text()
        'hello'
    """
    p = check_writable(path, probe=False)
    folder = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise GimlensError(f"cannot write {str(p)!r}: the folder {str(folder)!r} is not writable "
                           f"({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, p)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise GimlensError(f"cannot write {str(p)!r}: {err.strerror or err}") from err
        raise
    return p


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of `path`, or a [`GimlensError`][gimlens.errors.GimlensError] naming `what`
    could not be read and why.

    Examples:
        >>> import os, tempfile
        >>> read_text(atomic_write(os.path.join(tempfile.mkdtemp(), "a.txt"), "hi"))
        'hi'
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GimlensError(f"cannot read the {what} {str(path)!r}: {e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------- terminal


def progress(total: int | None = None, *, show: bool, desc: str, unit: str = "it", **kwargs: Any):
    """A tqdm bar (a silent one unless `show` and this is the main process).

    Examples:
        >>> with progress(3, show=False, desc="demo") as bar:
        ...     _ = bar.update(3)
        >>> bar.disable
        True
    """
    from tqdm.auto import tqdm

    from .distributed import is_main_process

    return tqdm(total=total, desc=desc, unit=unit, disable=not (show and is_main_process()),
                **kwargs)


# --------------------------------------------------------------------------------------- memory


def parse_bytes(value: int | str, what: str = "max_memory") -> int:
    """`2_000_000_000`, `"2GB"`, `"1.5 GiB"`, `"512MiB"` -> bytes.

    Examples:
        >>> parse_bytes("1.5 KiB"), parse_bytes("2GB")
        (1536, 2000000000)
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", value, re.I)
        if m:
            power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
            base = 1024 if m.group(3) or power == 0 else 1000
            n = int(float(m.group(1)) * base**power)
            if n > 0:
                return n
    raise GimlensError(f"{what} must be a positive number of bytes or a size like '4GB', got "
                       f"{value!r}")


def format_bytes(n: float) -> str:
    """`1536` -> `'1.5 KiB'`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def available_memory(device: torch.device | str) -> int:
    """Bytes free for new tensors on `device`: the free memory of a CUDA device, else the
    host's available RAM (`psutil.virtual_memory().available`).

    Examples:
        >>> available_memory("cpu") > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)
