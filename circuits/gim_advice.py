"""Where GIM was measured to help circuit discovery, and where to hurt: per-method defaults for
`gim=True` (`GIM_DEFAULTS`) and the combinations that warn (`GIM_HURTS`).

`circuits.discover(gim=True)` uses a method's measured defaults (`gim_for`); `circuits.attribute`
keeps GIM's definition (`gim=True`: every rule) and only warns (`warn_if_measured_to_hurt`). A
warning is a `UserWarning` naming the measurement, once per process and (method, rules).

Examples:
    >>> gim_for("EAP", None).is_off
    True
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:  # measured to hurt on some tasks
    ...     warnings.simplefilter("always")
    ...     gim_for("EAP-IG-inputs", True).q_scale is None
    True
"""

from __future__ import annotations

import warnings
from typing import Any

from gimlens.gim import RULES, GIMConfig

__all__ = ["GIM_DEFAULTS", "GIM_HURTS", "gim_for", "warn_if_measured_to_hurt"]

#: what `gim=True` means per discovery method, as overrides of every rule's default (`GIMConfig()`),
#: where measured per rule (SmolLM2, IOI, greater-than, capitals and induction, held out:
#: docs/performance.md, "GIM per rule"); a method not listed gets every rule
GIM_DEFAULTS: dict[str, dict[str, Any]] = {
    "EAP": {},  # every rule: at or near the best measured setting on all four tasks
    # the best IOI setting: the q/k/v scales hurt it there; on greater-than GIM off was better still
    # (so it warns: GIM_HURTS), on capitals and induction no setting differed from off beyond noise
    "EAP-IG-inputs": {"q_scale": None, "k_scale": None, "v_scale": None},
}

#: GIM rules measured to hurt a method's circuits (`"q_scale/k_scale/v_scale"`: those rules, measured
#: together; `"any"`: GIM as a whole, whatever rules are on), with the measurement
GIM_HURTS: dict[str, dict[str, str]] = {
    "EAP-IG-inputs": {"any": "SmolLM2 held out, which rules help depends on the task: every rule but the "
                      "q/k/v scales (discover's gim=True) lifts IOI (CPR 0.39 -> 0.46) but lowers "
                      "greater-than (0.90 -> 0.83, intervals apart); the q/k/v scales alone drop IOI's 1% / 5% "
                      "circuits 0.18 / 0.51 -> -0.07 / 0.24; on capitals and induction no setting differs "
                      "from GIM off beyond noise (docs/performance.md, 'GIM per rule', 'Circuit discovery'); "
                      "measure GIM on your task"},
    "EAP-IG-iterative": {"any": "SmolLM2 IOI held out, every rule on: mean faithfulness 0.25 -> 0.14 "
                                "(docs/performance.md, 'Circuit discovery'); no rule was measured alone"},
    "edge-pruning": {"any": "SmolLM2 IOI held out, every rule on: CPR 0.92 -> 0.56 (docs/performance.md, "
                            "'Circuit discovery'); no rule was measured alone; GIM on the warm start only "
                            "(a warm_start Graph scored with GIM) did not clearly hurt"},
}

_WARNED: set[tuple[str, str]] = set()


def warn_if_measured_to_hurt(method: str, config: GIMConfig, *, stacklevel: int = 3) -> None:
    """Warn (once per process and combination) when `config` switches on a rule that
    `GIM_HURTS[method]` lists; `stacklevel` as in `warnings.warn`, counted from here (3: the
    caller's caller)."""
    for rule, measured in GIM_HURTS.get(method, {}).items():
        found = [r for r in RULES if r.field in rule.split("/")]
        on = not config.is_off if not found else any(r.is_on(getattr(config, r.field)) for r in found)
        if on and (method, rule) not in _WARNED:
            _WARNED.add((method, rule))
            what, fix = ("GIM", "gim=None") if not found else \
                (f"GIM's {rule}", "gim={" + ", ".join(f"'{r.field}': {r.off!r}" for r in found) + "}")
            default = "" if method not in GIM_DEFAULTS else \
                " (circuits.discover(gim=True) uses the measured per-method default)"
            warnings.warn(f"{what} was measured to make {method} circuits less faithful: {measured}. "
                          f"Switch it off with {fix}{default}.", UserWarning, stacklevel=stacklevel)


def gim_for(method: str, gim) -> GIMConfig:
    """The GIM config `discover` uses: `gim=True` means `method`'s measured defaults
    (`GIM_DEFAULTS`); a `GIMConfig` or dict is taken as given. Warns
    (`warn_if_measured_to_hurt`) when a rule in `GIM_HURTS[method]` is on."""
    config = GIMConfig.coerce(gim)
    if gim is True and method in GIM_DEFAULTS:
        config = GIMConfig().with_overrides(**GIM_DEFAULTS[method])
    warn_if_measured_to_hurt(method, config, stacklevel=4)
    return config
