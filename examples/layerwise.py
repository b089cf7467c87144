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
# # Layer-wise integrated gradients: token-to-token flows inside a layer
#
# Token attribution tells which *input* tokens a prediction depends on. Layer-wise IG looks inside one layer:
# how much does the residual stream at position `i` entering the layer contribute to the layer's output at
# position `j`? For a target `j` and the layer's map `Φ_j`,
#
# `IG_{i→j} = Σ_d (z_{i,d} − z'_{i,d}) ∫₀¹ ∂‖Φ_j(z' + α (z − z')) − Φ_j(z')‖ / ∂z_{i,d} dα`,
#
# and each column sums to `‖Φ_j(z) − Φ_j(z')‖` (completeness, up to quadrature error, which is reported).
# Granularities: `layer` (the whole block, z → z), `att` (the attention sublayer, per head), `mlp` (per
# residual dimension).
#
# Runs offline on the embedded SmolLM2-135M-Instruct with the default 32 Gauss-Legendre nodes (run times measured
# on a busy 2-core machine: docs/examples.md). The completeness error falls fast with more nodes: on this prompt
# and layer about 20 % (largest over targets) with 16 nodes, 3 % with 32 and 0.02 % with 64 — pass `steps=64`
# when it matters.

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
try:
    from IPython.display import display
except ImportError:  # run as a plain script (IPython is not installed by the README's install)
    display = print

import gimlens

model = gimlens.load_model()  # embedded SmolLM2-135M-Instruct, offline
prompt = "When Mary and John went to the store, John gave a drink to"
print(model.to_str_tokens(prompt))

# %% [markdown]
# ## The flows of one layer
#
# Layer 20 of 30, the whole block (`layer`) and its attention (`att`), with the default input-token baseline
# (every position replaced by the target's own input, so a token's contribution to itself is 0 and the flows
# show what it *reads from other positions*).

# %%
layer = 20
res = gimlens.layerwise_ig(model, prompt, layers=layer, granularity=["layer", "att"], steps=32)
flow = res.flow(layer, "layer")
print("matrix [source, target]:", tuple(flow.matrix.shape))
has_flow = flow.total.abs() > 0  # BOS has nothing to read but itself: its total is 0
rel = flow.completeness_error[has_flow].abs() / flow.total[has_flow].abs()
print("largest relative completeness error:", float(rel.max()))
display(res.plot(layer))

# %% [markdown]
# ## A heatmap of our own
#
# `Flow.matrix` is a plain tensor. Almost every position sends a large flow to the BOS token (an *attention
# sink*), which swamps the colour scale; here we leave BOS out, normalise each target row by its total so that
# rows are comparable, and print the strongest other source of every target.

# %%
att = res.flow(layer, "att")
tokens = [repr(t)[1:-1] for t in res.tokens]
rows = (att.matrix / att.total.abs().clamp_min(1e-6)).T[1:, 1:]  # [target, source], BOS left out
fig, ax = plt.subplots(figsize=(7, 6))
lim = float(rows.abs().max())
im = ax.imshow(rows, cmap="RdBu_r", vmin=-lim, vmax=lim)
ax.set_xticks(range(len(tokens) - 1), tokens[1:], rotation=90)
ax.set_yticks(range(len(tokens) - 1), tokens[1:])
ax.set(xlabel="source position i", ylabel="target position j",
       title=f"layer {layer} attention: IG(i→j) / total(j), BOS left out")
fig.colorbar(im, ax=ax, fraction=0.046)
plt.show()
print("share of each target's flow that comes from BOS:", [round(float(x), 2) for x in (att.matrix[0] / att.total)[1:]])
for j in range(2, len(tokens)):
    i = 1 + int(att.matrix[1:j, j].argmax())  # the strongest earlier source other than BOS and j itself
    print(f"{tokens[j]!r:>10} reads most from {tokens[i]!r} (position {i})")

# %% [markdown]
# ## One head
#
# With `att`, every head has its own flows (`Flow.heads`, `[head, source, target]`). The head whose flows into
# the last position are largest:

# %%
strength = att.heads[:, :, -1].abs().sum(-1)
head = int(strength.argmax())
print("head strengths into the last position:", [round(float(s), 3) for s in strength])
display(res.plot(layer, "att", head=head))

# %% [markdown]
# ## Saving
#
# Results round-trip through JSON (with layer-wise IG's LIG-compatible sections); we write into a temporary
# folder, not the working directory.

# %%
out = Path(tempfile.mkdtemp()) / "layerwise.json"
res.save(out)
again = type(res).load(out)
torch.testing.assert_close(again.flow(layer, "layer").matrix, flow.matrix)
print(out, out.stat().st_size, "bytes")
