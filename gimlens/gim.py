"""GIM (Gradient Interaction Modifications, Edin et al. 2025) on TransformerLens hook points.

`with GIM(model):` installs forward hooks that leave every activation's value unchanged but
insert GIM's backward rules ([`gimlens.rules`][gimlens.rules]) into the autograd graph of each
forward pass run inside the block:

| rule (config field)   | hook points                                   | backward                        |
|-----------------------|-----------------------------------------------|---------------------------------|
| `freeze_norm`         | every `*.hook_scale` (pre-, post-, q/k norms) | the norm's scale is a constant  |
| `softmax_temperature` | `attn.hook_attn_scores` + `attn.hook_pattern` | softmax at temperature `T`      |
| `q/k/v_scale`         | `attn.hook_q` / `hook_k` / `hook_v`           | gradient × scale                |
| `gate/up_scale`       | `mlp.hook_pre` / `hook_pre_linear`            | gradient × scale (gated MLPs)   |

**One table.** Each rule is one [`Rule`][gimlens.gim.Rule] entry of
[`RULES`][gimlens.gim.RULES]: its config field, default, "off" value, validation, hook points
and hook functions. [`GIMConfig`][gimlens.gim.GIMConfig]'s validation, `GIMConfig.off()`,
`is_off` and [`gim_hooks`][gimlens.gim.gim_hooks] read it; the config's fields and the GIM
keywords of [`explain`][gimlens.attribution.explain.explain] are written out and checked
against it by a test, so adding a rule is one entry, one field and one keyword.

**Families.** A rule acts where the model has its component: gate/up only on gated MLPs,
the softmax rule only where the bridge fires `hook_attn_scores` and `hook_pattern` (not GPT-J or
OPT). [`gim_report`][gimlens.gim_report.gim_report] lists, per switched-on rule,
where it acts or why it is not applicable; `docs/concepts/models.md` has the table per family.

**Backward after the block.** The rules live in the graph built by the forward pass, so a
backward pass run after the `with` block still follows GIM, and a forward pass run outside the
block is plain, whatever block its backward runs in.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from .errors import GimlensError
from .rules import freeze, scale_grad, temperature_softmax
from .runtime import list_names, quiet_norm_rebuild, require_lens_model, run_hooked

__all__ = ["GIMConfig", "GIM", "Rule", "RULES", "fired_hooks", "gim_hooks", "unhooked_norms", "per_layer",
           "scale_hooks"]

Hook = tuple[str, Callable]


# ---------------------------------------------------------------------------------------------
# Hook points and hook functions of the rules.


def _n_layers(model) -> int:
    return int(model.cfg.n_layers)


def _norm_scale_names(model) -> list[str]:
    """Every norm scale hook the model has: the pre-norms (`ln1`, `ln2`), post-norms
    (`ln1_post`, `ln2_post`: Gemma 2/3, OLMo-2), q/k norms (`attn.q_norm`, `attn.k_norm`: Qwen3,
    Gemma 3, OLMo-2) and `ln_final`; `ln_final.hook_scale` is required (every family has it)."""
    return ["ln_final.hook_scale"] + sorted(
        n for n in model.hook_dict if n.endswith(".hook_scale") and n != "ln_final.hook_scale")


def unhooked_norms(model) -> list[str]:
    """Norm modules the model runs without a `hook_scale` hook point, which `freeze_norm`
    therefore cannot reach (e.g. StableLM's per-head q/k LayerNorms with `qk_layernorm`).

    A bridge wraps each norm it maps in a component with `hook_scale` (the wrapped module's
    name ends in `_original_component`); any other module whose class name says it is a norm
    is unreached. Empty for every family of `gimlens.testing.FAMILIES`.
    """
    named = getattr(model, "named_modules", None)  # a model view without modules: nothing
    return [] if named is None else [
        name for name, module in named()
        if "norm" in type(module).__name__.lower()
        and not type(module).__module__.startswith("transformer_lens")
        and not name.endswith("_original_component")]


def per_layer(*templates: str) -> Callable:
    """Hook names: each template (with `{l}`) for every layer, template by template."""
    return lambda model: [t.format(l=l) for t in templates for l in range(_n_layers(model))]


def _gated(template: str) -> Callable:
    """Per-layer names on gated MLPs only (plain MLPs have `hook_pre` too and are never scaled)."""
    names = per_layer(template)
    return lambda model: names(model) if getattr(model.cfg, "gated_mlp", False) else []


def _freeze_hooks(model, value, names: Sequence[str]) -> list[Hook]:
    return [(n, lambda tensor, hook: freeze(tensor)) for n in names]


def scale_hooks(model, value, names: Sequence[str]) -> list[Hook]:
    """Identity forward at every name; the gradient there multiplied by `value`."""
    scale = float(value)
    return [(n, lambda tensor, hook: scale_grad(tensor, scale)) for n in names]


def _temperature_hooks(model, value, names: Sequence[str]) -> list[Hook]:
    temperature = float(value)
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


# ---------------------------------------------------------------------------------------------
# The rule table.


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _is_number(v) and math.isfinite(v)


@dataclass(frozen=True)
class Rule:
    """One GIM rule: a config field and how it becomes hooks.

    Attributes:
        field: the [`GIMConfig`][gimlens.gim.GIMConfig] field (and `explain` keyword).
        default: its default value; `off`: the value that switches the rule off.
        doc: one line for the config's docstring.
        names: `model -> [hook name]`, the hook points the rule needs.
        make: `(model, value, names) -> [(hook name, fn)]`, the forward hooks.
        valid: whether a value other than `off` is acceptable; `expects` says what is.
        kind: the field's type annotation.
        is_on: whether a value switches the rule on (default: not `None` and not 1).
    """

    field: str
    default: Any
    off: Any
    doc: str
    names: Callable[[Any], list[str]]
    make: Callable[[Any, Any, Sequence[str]], list[Hook]]
    valid: Callable[[Any], bool] = _finite
    expects: str = "a finite number or None"
    kind: Any = float | None
    is_on: Callable[[Any], bool] = lambda v: v is not None and v != 1


def _scale(field: str, default: float, template: str, doc: str, gated: bool = False) -> Rule:
    names = _gated(template) if gated else per_layer(template)
    return Rule(field, default, None, doc, names, scale_hooks,
                valid=lambda v: _finite(v) and v >= 0, expects="a finite number >= 0 or None")


RULES: tuple[Rule, ...] = (
    Rule("freeze_norm", True, False,
         "treat every LayerNorm/RMSNorm scale as a constant in the backward pass.",
         _norm_scale_names, _freeze_hooks, valid=lambda v: isinstance(v, bool),
         expects="True, False or None", kind=bool, is_on=bool),
    Rule("softmax_temperature", 2.0, None,
         "temperature `T` of the attention-softmax gradient.",
         per_layer("blocks.{l}.attn.hook_attn_scores", "blocks.{l}.attn.hook_pattern"),
         _temperature_hooks, valid=lambda v: _finite(v) and v > 0,
         expects="a positive finite number or None"),
    _scale("q_scale", 0.25, "blocks.{l}.attn.hook_q", "gradient multiplier at `attn.hook_q`."),
    _scale("k_scale", 0.25, "blocks.{l}.attn.hook_k", "gradient multiplier at `attn.hook_k`."),
    _scale("v_scale", 0.5, "blocks.{l}.attn.hook_v", "gradient multiplier at `attn.hook_v`."),
    _scale("gate_scale", 0.5, "blocks.{l}.mlp.hook_pre",
           "gradient multiplier at `mlp.hook_pre` (gated MLPs only).", gated=True),
    _scale("up_scale", 0.5, "blocks.{l}.mlp.hook_pre_linear",
           "gradient multiplier at `mlp.hook_pre_linear` (gated MLPs only).", gated=True),
)
"""Every GIM rule, in the order of [`GIMConfig`][gimlens.gim.GIMConfig]'s fields. Adding a rule
is adding an entry here and a field (and an `explain` keyword) of the same name."""


# ---------------------------------------------------------------------------------------------
# The config: one field per rule, in the table's order (a test checks the two agree).


@dataclass(frozen=True)
class GIMConfig:
    """Which GIM rules run, with their constants: one field per entry of [`RULES`][gimlens.gim.RULES].

    Args:
        freeze_norm: treat every LayerNorm/RMSNorm scale as a constant in the backward pass.
            `False` or `None` switches it off.
        softmax_temperature: temperature `T` (> 0) of the attention-softmax gradient.
        q_scale: gradient multiplier (>= 0) at `attn.hook_q`.
        k_scale: gradient multiplier (>= 0) at `attn.hook_k`.
        v_scale: gradient multiplier (>= 0) at `attn.hook_v`.
        gate_scale: gradient multiplier (>= 0) at `mlp.hook_pre` (gated MLPs only).
        up_scale: gradient multiplier (>= 0) at `mlp.hook_pre_linear` (gated MLPs only).

    `None` switches any rule off (`None` for `freeze_norm` is stored as `False`); so does a
    scale of 1. A wrong value (a negative scale, a temperature <= 0, a string, ...) is a
    [`GimlensError`][gimlens.errors.GimlensError] naming the field.

    Methods: `GIMConfig.off()` (every rule off), `GIMConfig.coerce(gim)` (`True` -> defaults,
    `False`/`None` -> off, a dict -> overrides of the defaults), `GIMConfig.replace_defaults(**kw)`,
    `config.with_overrides(**kw)` (unknown names are an error) and `config.is_off`.

    Examples:
        >>> GIMConfig().softmax_temperature, GIMConfig(q_scale=0.1).q_scale
        (2.0, 0.1)
        >>> GIMConfig.off().is_off, GIMConfig(freeze_norm=None).freeze_norm
        (True, False)
    """

    freeze_norm: bool | None = True
    softmax_temperature: float | None = 2.0
    q_scale: float | None = 0.25
    k_scale: float | None = 0.25
    v_scale: float | None = 0.5
    gate_scale: float | None = 0.5
    up_scale: float | None = 0.5

    #: the rules behind the fields, in field order
    RULES: ClassVar[tuple[Rule, ...]] = RULES

    def __post_init__(self) -> None:
        for rule in self.RULES:
            v = getattr(self, rule.field)
            if v is None:  # None switches every rule off
                object.__setattr__(self, rule.field, rule.off)
            elif not rule.valid(v):
                raise GimlensError(f"{rule.field} must be {rule.expects}, got {v!r}")

    @classmethod
    def off(cls) -> "GIMConfig":
        """Every rule switched off: gradients are plain autograd."""
        return cls(**{r.field: r.off for r in cls.RULES})

    @classmethod
    def coerce(cls, gim) -> "GIMConfig":
        """`True` -> the defaults, `False`/`None` -> `off()`, a dict -> overrides of the defaults."""
        if gim is None or gim is False:
            return cls.off()
        if gim is True:
            return cls()
        if isinstance(gim, GIMConfig):
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
        known = [r.field for r in self.RULES]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise GimlensError(f"unknown GIM option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides) if overrides else self

    @property
    def is_off(self) -> bool:
        """Whether every rule is switched off (a scale of 1 counts as off)."""
        return not any(r.is_on(getattr(self, r.field)) for r in self.RULES)


# ---------------------------------------------------------------------------------------------
# Hooks and the context manager.


def _rule_hooks(model, config) -> list[tuple[Rule, list[Hook] | list[str]]]:
    """Per switched-on rule: its hooks, or (a list of names) the hook points it lacks."""
    hook_dict = model.hook_dict
    out = []
    for rule in type(config).RULES:
        value = getattr(config, rule.field)
        if not rule.is_on(value):
            continue
        names = rule.names(model)
        absent = [n for n in names if n not in hook_dict]
        if absent:
            out.append((rule, absent))
            continue
        seen: set[int] = set()
        unique = [n for n in names if not (id(hook_dict[n]) in seen or seen.add(id(hook_dict[n])))]
        out.append((rule, rule.make(model, value, unique)))
    return out


#: Per model: whether each probed hook point fires in a forward pass (bridges of some families
#: keep hook points that their attention never calls, e.g. GPT-J's and OPT's softmax hooks).
_FIRES: "weakref.WeakKeyDictionary[Any, dict[str, bool]]" = weakref.WeakKeyDictionary()


def _is_module(model) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


def fired_hooks(model, names: Sequence[str]) -> set[str]:
    """The hook points among `names` that fire in a forward pass of `model`, found by one probe
    (two tokens, no grad) the first time a name is asked about, then remembered per model.

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> model = tiny_model("gptj", n_layers=1)
        >>> sorted(fired_hooks(model, ["blocks.0.attn.hook_q", "blocks.0.attn.hook_pattern"]))
        ['blocks.0.attn.hook_q']
    """
    import torch

    known = _FIRES.setdefault(model, {})
    todo = [n for n in dict.fromkeys(names) if n not in known]
    if todo:
        seen: set[str] = set()
        probes = [(n, lambda x, hook, n=n: seen.add(n)) for n in todo]
        tokens = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
        with torch.no_grad(), quiet_norm_rebuild():
            run_hooked(model, tokens, fwd_hooks=probes)
        known.update({n: n in seen for n in todo})
    return {n for n in names if known[n]}


def gim_hooks(model, config: "GIMConfig | None" = None) -> list[Hook]:
    """The forward hooks `(name, fn)` that implement `config` on `model`.

    For callers that combine GIM with hooks of their own in one `model.hooks(...)` call.
    Raises [`GimlensError`][gimlens.errors.GimlensError] naming every hook point a switched-on
    rule needs but the model lacks (never a silent subset). Names that alias one hook point are
    hooked once. Warns when `freeze_norm` is on and the model runs norms without a `hook_scale`
    ([`unhooked_norms`][gimlens.gim.unhooked_norms]).

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> len(gim_hooks(tiny_model("llama", n_layers=1)))  # 3 norms, 2 softmax, q/k/v, gate/up
        10
    """
    require_lens_model(model)
    config = GIMConfig() if config is None else GIMConfig.coerce(config)
    made = _rule_hooks(model, config)
    missing = [f"{n} (for {rule.field})" for rule, hooks in made if hooks and isinstance(hooks[0], str)
               for n in hooks]
    if missing:
        raise GimlensError(
            f"this model lacks hook points that the switched-on GIM rules need: {list_names(missing)}. "
            "Switch those rules off (set them to None) or use a TransformerLens model that "
            "exposes these hooks."
        )
    probe = _is_module(model)  # a real model (not a view of one) can be probed for idle hooks
    for rule, hooks in made:
        if probe and hooks and not fired_hooks(model, [name for name, _ in hooks]):
            warnings.warn(f"GIM's {rule.field} cannot act on this model: its hook points exist "
                          f"but never fire ({hooks[0][0]}, ...); see gimlens.gim_report", stacklevel=2)
        if rule.field == "freeze_norm" and (unreached := unhooked_norms(model)):
            warnings.warn(f"GIM's freeze_norm cannot reach {len(unreached)} norm module(s) that "
                          f"have no hook_scale hook point (their scale stays differentiable): "
                          f"{', '.join(unreached[:4])}", stacklevel=2)
    return [hook for _, hooks in made for hook in hooks]


class GIM:
    """Context manager: forward passes run inside it get GIM's backward rules.

    Args:
        model: a TransformerLens `TransformerBridge` (or `HookedTransformer`).
        config: a [`GIMConfig`][gimlens.gim.GIMConfig] (or `True`/`False`/a dict, see
            `GIMConfig.coerce`); keyword arguments override its fields.

    Forward values are unchanged (bitwise on LayerNorm models; on RMSNorm bridges an edited
    `hook_scale` makes TransformerLens rebuild the norm from its parts, a rounding-level change
    whose warning is silenced inside the block). Hooks are removed on exit, also after an
    exception. The rules live in the graphs built inside the block, so `backward()` may run
    after it.

    Examples:
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

    def __init__(self, model, config: "GIMConfig | bool | dict | None" = None, **overrides) -> None:
        base = GIMConfig() if config is None else GIMConfig.coerce(config)
        self.config = base.with_overrides(**overrides)
        self.model = model
        self._hooks = gim_hooks(model, self.config)  # validates before anything is touched
        self._stack: ExitStack | None = None

    def __enter__(self) -> "GIM":
        stack = ExitStack()
        try:
            stack.enter_context(quiet_norm_rebuild())
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
