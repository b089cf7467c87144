"""Where each GIM rule acts on a given model, one line per rule.

A rule acts where the model has its component; where it has none it is *not applicable* and
the report says why, so no rule is skipped silently (the table per family is in
`docs/concepts/models.md`).

Examples:
    >>> from gimlens.testing import tiny_model
    >>> report = gim_report(tiny_model("gptj", n_layers=1))
    >>> report["softmax_temperature"]
    "not applicable: this model's attention softmax hook points never fire"
"""

from __future__ import annotations

from .gim import GIMConfig, _rule_hooks, fired_hooks, gim_hooks, unhooked_norms

__all__ = ["gim_report"]


def gim_report(model, config: "GIMConfig | None" = None) -> dict[str, str]:
    """Where each switched-on rule of `config` acts on `model`, one line per rule.

    A rule acts where the model has its component; where it has none the rule is *not
    applicable* and says why: a plain (non-gated) MLP has no gate/up projections, and some
    bridges (GPT-J, OPT) run attention without firing `hook_attn_scores` / `hook_pattern`, so
    the softmax rule cannot act there. One probe forward pass (two tokens, no grad) finds the
    hooks that fire. Rules missing hook points raise as in [`gim_hooks`][gimlens.gim.gim_hooks].

    Examples:
        >>> from gimlens.testing import tiny_model
        >>> report = gim_report(tiny_model("gpt2", n_layers=1))
        >>> report["q_scale"], report["gate_scale"]
        ('acts at 1 hook point', 'not applicable: the model has no gated MLP')
    """
    config = GIMConfig() if config is None else GIMConfig.coerce(config)
    gim_hooks(model, config)  # validates (and warns as it does)
    report: dict[str, str] = {}
    for rule, hooks in _rule_hooks(model, config):
        if not hooks:
            report[rule.field] = f"not applicable: the model has no {_COMPONENT[rule.field]}"
            continue
        n = len(fired_hooks(model, list(dict.fromkeys(name for name, _ in hooks))))
        report[rule.field] = (f"acts at {n} hook point{'s' if n != 1 else ''}" if n else
                              f"not applicable: this model's {_COMPONENT[rule.field]} hook points never fire")
    if "freeze_norm" in report and (unreached := unhooked_norms(model)):
        report["freeze_norm"] += (f"; cannot reach {len(unreached)} norm module(s) without a "
                                  f"hook_scale: {', '.join(unreached[:4])}")
    return {r.field: report[r.field] for r in type(config).RULES if r.field in report}


#: What each rule needs, for `gim_report`'s lines.
_COMPONENT = {"freeze_norm": "norm", "softmax_temperature": "attention softmax",
              "q_scale": "query projection", "k_scale": "key projection",
              "v_scale": "value projection", "gate_scale": "gated MLP", "up_scale": "gated MLP"}
