"""GIM (Gradient Interaction Modifications, Edin et al. 2025) on TransformerLens hook points.

``with GIM(model):`` installs forward hooks that leave every activation's value unchanged but
insert GIM's backward rules (:mod:`gimlens.rules`) into the autograd graph of each forward pass
run inside the block:

==================  =====================================  ==============================
rule (config)       hook points                            backward
==================  =====================================  ==============================
freeze_norm         every ``*.hook_scale``                 the norm's scale is a constant
softmax_temperature ``attn.hook_attn_scores`` + ``hook_pattern``  softmax at temperature T
q/k/v_scale         ``attn.hook_q`` / ``hook_k`` / ``hook_v``  gradient × scale
gate/up_scale       ``mlp.hook_pre`` / ``hook_pre_linear``  gradient × scale (gated MLPs)
==================  =====================================  ==============================

**Backward after the block.** The rules live in the graph built by the forward pass, so a
backward pass run after the ``with`` block still follows GIM, and a forward pass run outside the
block is plain, whatever block its backward runs in.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

from .errors import GimlensError
from .rules import freeze, scale_grad, temperature_softmax

__all__ = ["GIMConfig", "GIM", "gim_hooks"]

Hook = tuple[str, Callable]


@dataclass(frozen=True)
class GIMConfig:
    """Which GIM rules run, with their constants. ``None`` (or 1 for scales) switches one off.

    Args:
        freeze_norm: treat every LayerNorm/RMSNorm scale as a constant in the backward pass.
        softmax_temperature: temperature ``T`` of the attention-softmax gradient.
        q_scale, k_scale, v_scale: gradient multipliers at ``attn.hook_q/k/v``.
        gate_scale, up_scale: gradient multipliers at ``mlp.hook_pre`` / ``mlp.hook_pre_linear``
            (gated MLPs only; plain MLPs are never scaled).

    Example:
        >>> GIMConfig().softmax_temperature
        2.0
        >>> GIMConfig.off().is_off
        True
    """

    freeze_norm: bool = True
    softmax_temperature: float | None = 2.0
    q_scale: float | None = 0.25
    k_scale: float | None = 0.25
    v_scale: float | None = 0.5
    gate_scale: float | None = 0.5
    up_scale: float | None = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.freeze_norm, bool):
            raise GimlensError(f"freeze_norm must be True or False, got {self.freeze_norm!r}")
        t = self.softmax_temperature
        if t is not None and not (_is_number(t) and t > 0 and math.isfinite(t)):
            raise GimlensError(
                f"softmax_temperature must be a positive finite number or None, got {t!r}"
            )
        for name in ("q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and math.isfinite(v)):
                raise GimlensError(f"{name} must be a finite number or None, got {v!r}")

    @classmethod
    def off(cls) -> "GIMConfig":
        """Every rule switched off: gradients are plain autograd."""
        return cls(False, None, None, None, None, None, None)

    @classmethod
    def coerce(cls, gim: "GIMConfig | bool | dict | None") -> "GIMConfig":
        """``True`` → defaults, ``False``/``None`` → :meth:`off`, a dict → overrides of the defaults."""
        if gim is None or gim is False:
            return cls.off()
        if gim is True:
            return cls()
        if isinstance(gim, cls):
            return gim
        if isinstance(gim, dict):
            return cls.replace_defaults(**gim)
        raise GimlensError(f"gim must be a GIMConfig, True/False, a dict or None; got {gim!r}")

    @classmethod
    def replace_defaults(cls, **overrides) -> "GIMConfig":
        """The defaults with some fields replaced; unknown names are an error."""
        return cls().with_overrides(**overrides)

    def with_overrides(self, **overrides) -> "GIMConfig":
        """This config with some fields replaced; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise GimlensError(f"unknown GIM option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides) if overrides else self

    @property
    def is_off(self) -> bool:
        return not any(_rule_on(self, r.field) for r in _RULES)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rule_on(config: GIMConfig, field: str) -> bool:
    v = getattr(config, field)
    if field == "freeze_norm":
        return bool(v)
    return v is not None and v != 1


# ---------------------------------------------------------------------------------------------
# The rule table: config field -> hook points -> hook functions. Adding a rule is one entry.


def _n_layers(model) -> int:
    return int(model.cfg.n_layers)


def _norm_scale_names(model) -> list[str]:
    """Every norm scale hook: ln1 of each block and ln_final, plus ln2 and any other norm."""
    names = [f"blocks.{l}.ln1.hook_scale" for l in range(_n_layers(model))]
    names.append("ln_final.hook_scale")
    names += sorted(n for n in model.hook_dict if n.endswith(".hook_scale") and n not in names)
    return names


def _per_layer(template: str) -> Callable:
    return lambda model: [template.format(l=l) for l in range(_n_layers(model))]


def _is_gated(model) -> bool:
    return bool(getattr(model.cfg, "gated_mlp", False))


def _gated_names(template: str) -> Callable:
    return lambda model: _per_layer(template)(model) if _is_gated(model) else []


def _freeze_hook(tensor, hook):
    return freeze(tensor)


def _scale_hook(scale: float) -> Callable:
    def hook_fn(tensor, hook):
        return scale_grad(tensor, scale)

    return hook_fn


def _temperature_hooks(model, temperature: float) -> list[Hook]:
    hooks: list[Hook] = []
    for l in range(_n_layers(model)):
        stored: list = [None]

        def keep_scores(tensor, hook, stored=stored):
            stored[0] = tensor
            return None

        def route_pattern(tensor, hook, stored=stored):
            scores, stored[0] = stored[0], None
            if scores is None or scores.shape != tensor.shape:
                raise GimlensError(
                    "GIM's softmax rule needs hook_attn_scores to fire before hook_pattern with "
                    f"the same shape; got scores {None if scores is None else tuple(scores.shape)}"
                    f" and pattern {tuple(tensor.shape)}"
                )
            if not (tensor.requires_grad or scores.requires_grad):
                return None
            return temperature_softmax(scores, tensor, temperature)

        hooks.append((f"blocks.{l}.attn.hook_attn_scores", keep_scores))
        hooks.append((f"blocks.{l}.attn.hook_pattern", route_pattern))
    return hooks


@dataclass(frozen=True)
class _Rule:
    field: str
    names: Callable  # model -> hook names the rule needs
    make: Callable  # (model, value, names) -> [(name, fn)]


_RULES: tuple[_Rule, ...] = (
    _Rule("freeze_norm", _norm_scale_names, lambda m, v, ns: [(n, _freeze_hook) for n in ns]),
    _Rule(
        "softmax_temperature",
        lambda m: _per_layer("blocks.{l}.attn.hook_attn_scores")(m)
        + _per_layer("blocks.{l}.attn.hook_pattern")(m),
        lambda m, v, ns: _temperature_hooks(m, float(v)),
    ),
    *(
        _Rule(f"{x}_scale", _per_layer(f"blocks.{{l}}.attn.hook_{x}"),
              lambda m, v, ns: [(n, _scale_hook(float(v))) for n in ns])
        for x in ("q", "k", "v")
    ),
    _Rule("gate_scale", _gated_names("blocks.{l}.mlp.hook_pre"),
          lambda m, v, ns: [(n, _scale_hook(float(v))) for n in ns]),
    _Rule("up_scale", _gated_names("blocks.{l}.mlp.hook_pre_linear"),
          lambda m, v, ns: [(n, _scale_hook(float(v))) for n in ns]),
)


def gim_hooks(model, config: GIMConfig | None = None) -> list[Hook]:
    """The forward hooks ``(name, fn)`` that implement ``config`` on ``model``.

    For callers that combine GIM with hooks of their own in one ``model.hooks(...)`` call.
    Raises :class:`GimlensError` naming every hook point a switched-on rule needs but the model
    lacks (never a silent subset). Names that alias one hook point are hooked once.

    Example:
        >>> from gimlens.testing import tiny_model
        >>> len(gim_hooks(tiny_model("llama", n_layers=1)))  # 3 norms, 2 softmax, q/k/v, gate/up
        10
    """
    config = GIMConfig() if config is None else config
    hook_dict = model.hook_dict
    hooks: list[Hook] = []
    missing: list[str] = []
    for rule in _RULES:
        if not _rule_on(config, rule.field):
            continue
        names = rule.names(model)
        absent = [n for n in names if n not in hook_dict]
        if absent:
            missing += [f"{n} (for {rule.field})" for n in absent]
            continue
        seen: set[int] = set()
        unique = [n for n in names if not (id(hook_dict[n]) in seen or seen.add(id(hook_dict[n])))]
        hooks += rule.make(model, getattr(config, rule.field), unique)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise GimlensError(
            f"this model lacks hook points that the switched-on GIM rules need: {shown}. "
            "Switch those rules off (set them to None) or use a TransformerLens model that "
            "exposes these hooks."
        )
    return hooks


class GIM:
    """Context manager: forward passes run inside it get GIM's backward rules.

    Args:
        model: a TransformerLens ``TransformerBridge`` (or ``HookedTransformer``).
        config: a :class:`GIMConfig` (or ``True``/``False``/a dict, see :meth:`GIMConfig.coerce`);
            keyword arguments override its fields.

    Forward values are unchanged (bitwise on LayerNorm models; on RMSNorm bridges an edited
    ``hook_scale`` makes TransformerLens rebuild the norm from its parts, a rounding-level change
    whose warning is silenced inside the block). Hooks are removed on exit, also after an
    exception. The rules live in the graphs built inside the block, so ``backward()`` may run
    after it.

    Example:
        >>> import torch
        >>> from gimlens import GIM
        >>> from gimlens.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> tokens = model.to_tokens("When Mary and John went to the store")
        >>> emb = model.embed(tokens).detach().requires_grad_()
        >>> with GIM(model, softmax_temperature=2.0):
        ...     logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda t, hook: emb)])
        >>> grad, = torch.autograd.grad(logits[0, -1].max(), emb)
        >>> grad.shape == emb.shape
        True
    """

    def __init__(self, model, config: GIMConfig | bool | dict | None = None, **overrides) -> None:
        base = GIMConfig() if config is None else GIMConfig.coerce(config)
        self.config = base.with_overrides(**overrides)
        self.model = model
        self._hooks = gim_hooks(model, self.config)  # validates before anything is touched
        self._stack: ExitStack | None = None

    def __enter__(self) -> "GIM":
        stack = ExitStack()
        try:
            quiet = stack.enter_context(warnings.catch_warnings())
            del quiet
            warnings.filterwarnings("ignore", message=_NORM_REBUILD_WARNING)
            stack.enter_context(self.model.hooks(fwd_hooks=self._hooks))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


#: TransformerLens warns on every forward that a hook edited hook_scale (GIM's norm freeze).
_NORM_REBUILD_WARNING = r"A forward hook edited hook_scale/hook_normalized"
