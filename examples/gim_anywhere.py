# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # GIM around your own backward pass
#
# `with gimlens.GIM(model):` changes the **backward** pass of every forward pass run inside the block, and
# nothing else: logits are the same, gradients follow GIM's rules (norm freezing, temperature-2 softmax
# gradient, Q/K/V and gate/up scaling). This notebook wraps a backward pass of our own, checks that the forward
# values do not move, and shows which gradients change: per layer at the residual stream, for all rules together
# and for each rule alone.
#
# It runs offline on the embedded SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads); measured: 150 s with one
# torch thread on a busy 2-core machine (docs/examples.md lists every notebook's time).

# %%
import matplotlib.pyplot as plt
import torch

import gimlens
from gimlens import GIM, GIMConfig

torch.manual_seed(0)
model = gimlens.load_model()  # embedded SmolLM2-135M-Instruct, offline
prompt = "The capital of France is"
tokens = model.to_tokens(prompt)
paris = model.to_single_token(" Paris")
print(model.to_str_tokens(tokens), "target:", repr(model.to_string(paris)))

# %% [markdown]
# ## The context manager
#
# The seed's example: run the forward pass inside the block, backward wherever you like. The rules live in the
# autograd graph built by the forward pass, so `backward()` after the block still follows GIM. Here the model's
# parameters receive the gradients.

# %%
with GIM(model):  # defaults: freeze norms, T=2, q/k 0.25, v 0.5, gate/up 0.5
    logits = model(tokens)
logits[0, -1].max().backward()  # runs after the block, still under GIM
w_q = model.blocks[0].attn.q.weight  # any parameter: it now holds a GIM gradient
print("grad norm of blocks.0.attn.q.weight under GIM:", float(w_q.grad.norm()))
model.zero_grad(set_to_none=True)  # leave the model as we found it

# %% [markdown]
# ## Gradients at the input and at every layer
#
# To differentiate with respect to activations we make the token embeddings a leaf (a forward hook at
# `hook_embed` that returns a detached copy with `requires_grad`) and keep the residual stream entering every
# block (`blocks.{l}.hook_resid_pre`). GIM's own hooks and ours go into the same forward pass.

# %%
n_layers = model.cfg.n_layers


def run(config: GIMConfig):
    """Target logit, embeddings and per-layer residual-stream gradients under ``config``."""
    kept = {}

    def make_leaf(t, hook):
        kept["embed"] = t.detach().requires_grad_()
        return kept["embed"]

    def keep(t, hook, layer):
        kept[layer] = t

    hooks = [("hook_embed", make_leaf)] + [
        (f"blocks.{l}.hook_resid_pre", lambda t, hook, l=l: keep(t, hook, l)) for l in range(n_layers)
    ]
    with GIM(model, config), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    target = logits[0, -1, paris]
    grads = torch.autograd.grad(target, [kept["embed"]] + [kept[l] for l in range(n_layers)])
    return logits.detach(), kept["embed"].detach(), grads


plain_logits, embed, plain_grads = run(GIMConfig.off())
gim_logits, _, gim_grads = run(GIMConfig())
print("max |logit difference| with and without GIM:", float((gim_logits - plain_logits).abs().max()))
print("top prediction:", repr(model.to_string(gim_logits[0, -1].argmax())))

# %% [markdown]
# The forward values agree (on RMSNorm models TransformerLens rebuilds the frozen norm from its parts, a
# rounding-level difference). The gradients do not:

# %%
def layer_norms(grads):
    """Gradient norm at the residual stream entering each block, summed over positions."""
    return torch.stack([g[0].norm(dim=-1).sum() for g in grads[1:]])


plain_norms, gim_norms = layer_norms(plain_grads), layer_norms(gim_grads)
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.plot(plain_norms, "o-", label="plain autograd")
ax.plot(gim_norms, "o-", label="GIM (all rules)")
ax.set(xlabel="layer", ylabel="‖∂ logit / ∂ resid_pre‖ (sum over positions)", yscale="log",
       title=f"gradient of the ' Paris' logit, {prompt!r}")
ax.legend()
plt.show()

# %% [markdown]
# ## One rule at a time
#
# Each rule alone (all others off), as a ratio to plain autograd. The gradient entering the last block passes
# through only that block and the final norm, so the rules' effects add up towards the input.

# %%
rules = {
    "freeze_norm": dict(freeze_norm=True),
    "softmax T=2": dict(softmax_temperature=2.0),
    "q/k/v scaling": dict(q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "gate/up scaling": dict(gate_scale=0.5, up_scale=0.5),
}
per_rule = {name: layer_norms(run(GIMConfig.off().with_overrides(**kw))[2]) for name, kw in rules.items()}

fig, ax = plt.subplots(figsize=(8, 3.5))
for name, norms in per_rule.items():
    ax.plot(norms / plain_norms, "o-", ms=3, label=name)
ax.plot(gim_norms / plain_norms, "k--", label="all rules (GIM)")
ax.axhline(1.0, color="grey", lw=0.5)
ax.set(xlabel="layer", ylabel="gradient norm / plain", yscale="log", title="which rule changes which gradients")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## From gradients to token attributions
#
# Gradient × input against a baseline token (`" "`) is exactly what `gimlens.explain` computes: one score per
# token, the gradient taken under GIM. Our own backward pass reproduces it.

# %%
baseline = model.to_single_token(" ")
base_embed = model.embed(torch.full_like(tokens, baseline)).detach()
ours = ((embed - base_embed) * gim_grads[0]).sum(-1)[0]
theirs = gimlens.explain(model, tokens[0], target_token_id=paris)
plain = ((embed - base_embed) * plain_grads[0]).sum(-1)[0]
torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-5)

labels = model.to_str_tokens(tokens)
fig, ax = plt.subplots(figsize=(8, 3))
x = torch.arange(len(labels))
ax.bar(x - 0.2, plain, width=0.4, label="gradient × input (plain)")
ax.bar(x + 0.2, ours, width=0.4, label="GIM × input")
ax.set_xticks(x, labels, rotation=30)
ax.axhline(0, color="grey", lw=0.5)
ax.set(ylabel="contribution to the ' Paris' logit")
ax.legend()
plt.show()

# %% [markdown]
# The model is left as found: no hook stays behind after a `GIM` block, and no parameter flag was changed.

# %%
assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())
assert all(p.grad is None for p in model.parameters())
