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
# # Token attribution: which input tokens a prediction depends on
#
# 1. the quick start: `gimlens.explain` on "The capital of France is";
# 2. every attribution method side by side, with plots;
# 3. targets beyond one token: a logit difference and a multi-token continuation;
# 4. faithfulness: comprehensiveness, sufficiency and agreement with leave-one-out ablation.
#
# Everything runs offline on the embedded SmolLM2-135M-Instruct (measured: 1,056 s with one torch thread on a busy
# 2-core machine; docs/examples.md lists every notebook's time). The data sets
# here are deliberately tiny (8 prompts, 16 integration steps) so that CI stays fast: more prompts and
# more steps give better estimates of the faithfulness numbers.

# %%
import matplotlib.pyplot as plt
import torch
try:
    from IPython.display import display
except ImportError:  # run as a plain script (IPython is not installed by the README's install)
    display = print

import gimlens
from gimlens.attribution import Continuation, LogitDiff
from gimlens.evaluate import ablation_agreement, attribution_faithfulness

torch.manual_seed(0)
model = gimlens.load_model()  # embedded SmolLM2-135M-Instruct, offline

# %% [markdown]
# ## Quick start
#
# `explain` returns one score per input token: the gradient of the top prediction's logit, taken under GIM,
# times the difference between the token's embedding and a baseline token's (`" "`), summed over `d_model`.
# It keeps the call form of the `gim-explain` package.

# %%
ids = model.to_tokens("The capital of France is")[0]
scores = gimlens.explain(model, ids)  # GIM × input for the top prediction, one score per token
top = model(ids[None])[0, -1].argmax()
print("prediction:", repr(model.to_string(top)))
for token, score in zip(model.to_str_tokens(ids), scores.tolist()):
    print(f"{token!r:>16} {score:+.3f}")

# %% [markdown]
# `gimlens.attribute` is the general entry point: text or token inputs, any method, any target. It returns an
# `Attribution`, which plots itself as a heatmap and renders as coloured HTML in a notebook. By default a leading
# BOS token is not scored (it is its own baseline, so it scores 0); `explain` scores it, as `gim-explain` does.

# %%
attr = gimlens.attribute(model, "The capital of France is", target=" Paris")
display(attr)
fig = attr.plot()
display(fig)

# %% [markdown]
# ## Every method side by side
#
# - `gim`: gradient × input with GIM's backward rules (one backward pass);
# - `gradient_x_input`: the same with plain gradients;
# - `integrated_gradients`: the gradient integrated from the baseline to the input (Gauss-Legendre nodes). Its
#   completeness delta `|Σ scores − (F(x) − F(x'))|` says how exact the integral is: when it is not small next to
#   `F(x) − F(x')`, raise `steps` (the integrand is rough on real models, so check the delta again);
# - `feature_ablation`: leave-one-out, the logit drop when a token is replaced by the baseline.

# %%
prompt = "When Mary and John went to the store, John gave a drink to"
methods = {
    "gim": {},
    "gradient_x_input": {},
    "integrated_gradients": {"steps": 16},
    "feature_ablation": {},
}
results = {m: gimlens.attribute(model, prompt, method=m, **kw) for m, kw in methods.items()}
ig = results["integrated_gradients"]
print("target:", ig.describe_target(), "| IG: sum of scores", float(ig.scores.sum()),
      "| completeness delta", float(ig.delta[0]))

tokens = results["gim"].tokens[0]
matrix = torch.stack([r.scores[0] / r.scores[0].abs().max() for r in results.values()])
fig, ax = plt.subplots(figsize=(11, 2.8))
im = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
ax.set_xticks(range(len(tokens)), tokens, rotation=45, ha="right")
ax.set_yticks(range(len(results)), list(results))
ax.set_title(f"{results['gim'].describe_target()}, each method scaled to its largest |score|")
fig.colorbar(im, ax=ax, fraction=0.02)
plt.show()

# %% [markdown]
# ## Targets beyond one token
#
# A **logit difference** explains a contrast: what makes the model say " Mary" rather than " John"?

# %%
diff = gimlens.attribute(model, prompt, target=LogitDiff(" Mary", " John"))
display(diff.plot())

# %% [markdown]
# A **multi-token continuation** gets one row of scores per continuation token (its logit at the position that
# predicts it, with the earlier continuation tokens in the input) plus their sum. A string target that is several
# tokens long becomes a continuation automatically.

# %%
cont = gimlens.attribute(model, "The Eiffel Tower is in the city of", target=Continuation(" Paris, France"))
print(cont.scores.shape, "(batch, continuation tokens, positions)")
display(cont.plot())

# %% [markdown]
# ## Faithfulness
#
# Comprehensiveness (higher is better): replace the top-k tokens (k = 1, 2, …) by the baseline and measure the
# relative drop of the target logit. Sufficiency (lower is better): replace the least important 50–99 % of the
# tokens. The first and last tokens are never replaced. We use 8 prompts; the GIM paper uses thousands.

# %%
prompts = [
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is a famous landmark located in the city of",
    "After the long winter the snow finally melted and the flowers began to",
    "She opened the fridge, took out a bottle of cold milk and poured it into a",
    "The capital of Germany, a large country in the middle of Europe, is the city of",
    "In the morning I drink a cup of hot coffee, and in the evening a cup of",
    "The teacher asked the students to open their books and turn to page",
    "Alice and Bob played chess all afternoon, and in the end the winner was",
]
batch = {m: gimlens.attribute(model, prompts, method=m, batch_size=32, **kw) for m, kw in methods.items()}
reference = batch["feature_ablation"]
table = {}
for m, a in batch.items():
    f = attribution_faithfulness(model, a)
    agree = ablation_agreement(model, a, reference=reference)
    table[m] = {**f.summary(), "spearman_vs_ablation": float(agree.nanmean())}
print(f"{'method':>22} {'comprehensiveness':>18} {'sufficiency':>12} {'spearman':>9}")
for m, row in table.items():
    print(f"{m:>22} {row['comprehensiveness']:18.3f} {row['sufficiency']:12.3f} {row['spearman_vs_ablation']:9.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
names = list(table)
axes[0].bar(names, [table[m]["comprehensiveness"] for m in names], color="tab:green")
axes[0].set_title("comprehensiveness (higher is better)")
axes[1].bar(names, [table[m]["sufficiency"] for m in names], color="tab:red")
axes[1].set_title("sufficiency (lower is better)")
for ax in axes:
    ax.tick_params(axis="x", rotation=30)
plt.show()

# %% [markdown]
# With 8 prompts these numbers are noisy; run the same cells on a few hundred prompts (and more integration
# steps) before drawing conclusions. Feature ablation agrees with itself by construction (Spearman 1).
