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
# # An IOI circuit with EAP-IG, with and without GIM
#
# Indirect object identification (IOI): in "When Mary and John went to the store, John gave a drink to", the
# model should say " Mary". We
#
# 1. generate IOI prompts and their corruptions (other names) with `circuits.tasks`;
# 2. score every edge of SmolLM2's residual graph with EAP-IG, once with plain gradients and once with GIM;
# 3. compare the two faithfulness curves (exact edge patching);
# 4. select a circuit, render it, export it as GraphML and EAP-IG / MIB JSON, read it back with networkx and
#    list its most important attention heads.
#
# This runs offline on the embedded SmolLM2-135M-Instruct (measured: 433 s with one torch thread on 2 busy CPU
# cores) because it uses only 32 prompts, 5 integration steps and 7 circuit sizes. With so few prompts the curves
# are noisy: more prompts (the literature uses hundreds) give better estimates; on a GPU use `n=256` or more and
# the default sizes.

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import networkx as nx
import torch
try:
    from IPython.display import Image, display
except ImportError:  # run as a plain script (IPython is not installed by the README's install)
    Image, display = (lambda filename: f"image written to {filename}"), print

import circuits
import gimlens
from circuits.tasks import make

torch.manual_seed(0)
model = gimlens.load_model()  # embedded SmolLM2-135M-Instruct, offline
out = Path(tempfile.mkdtemp())  # everything we write goes here, not into the working directory

# %% [markdown]
# ## IOI data
#
# Each example has a clean prompt, a corrupted prompt of the same length in which the names are replaced by
# others (the "ABC" corruption), and labels (indirect object, subject). The metric is the logit difference
# `logit(IO) − logit(S)` at the last position.

# %%
task = make("ioi", model, n=32, seed=0)
for clean, corrupted in list(zip(task.prompts, task.corrupted_prompts))[:3]:
    print(f"{clean!r}\n  corrupted: {corrupted!r}")
with torch.no_grad():
    clean_logits = model(task.clean, attention_mask=task.attention_mask)
    corrupted_logits = model(task.corrupted, attention_mask=task.attention_mask)
clean_diff = task.metric(clean_logits)
print(f"{len(task)} prompts; logit difference clean {float(clean_diff.mean()):.2f}, "
      f"corrupted {float(task.metric(corrupted_logits).mean()):.2f}; IO preferred to S in "
      f"{float((clean_diff > 0).float().mean()):.0%}, IO the top prediction in "
      f"{float(task.top1(clean_logits).float().mean()):.0%} of the prompts")

# %% [markdown]
# ## Edge scores: EAP-IG with and without GIM
#
# `circuits.attribute` fills the dense `[n_forward, n_backward]` score matrix of a `Graph`. EAP-IG-inputs
# averages the gradients of runs whose token embeddings move from the corrupted to the clean ones
# (`ig_steps` points). `gim=True` makes every one of those backward passes follow GIM's rules.

# %%
graphs = {}
for label, gim in (("EAP-IG", False), ("EAP-IG + GIM", True)):
    graphs[label] = circuits.attribute(model, circuits.Graph.from_model(model), task, method="EAP-IG-inputs",
                                       ig_steps=5, gim=gim, batch_size=16)
graph = graphs["EAP-IG + GIM"]
print(graph)
print("valid edges:", graph.n_valid_edges)
# IG's completeness: every destination reads the embedding through the residual stream, so the edges leaving
# `input` add up (up to the error of 5 Riemann steps) to the metric's change from clean to corrupted. GIM's
# gradients are deliberately not the true gradients, so under GIM the sum need not match.
change = float(task.metric(corrupted_logits).mean() - clean_diff.mean())
print(f"m_corrupt - m_clean = {change:.2f}; sum of the input's edge scores:",
      {k: round(float(g.scores[g.forward_index_of("input")].sum()), 2) for k, g in graphs.items()})
for label, g in graphs.items():  # Graph.edges is a read-only view built from the dense tensors
    strongest = sorted(g.edges.values(), key=lambda e: -abs(e.score))[:5]
    print(f"{label:>13}:", ", ".join(f"{e.name} {e.score:+.3f}" for e in strongest))

# %% [markdown]
# ## Faithfulness curves
#
# For each size (a percentage of the edges), keep the top edges by |score|, prune edges that cannot reach both
# the input and the logits, and run the clean prompts with every other edge patched to its corrupted value.
# Normalised faithfulness is `(m_circuit − m_corrupt) / (m_clean − m_corrupt)`: 0 is the corrupted model, 1 the
# clean one. CPR is the area under the curve (higher is better), CMD the area between the curve and 1 (lower is
# better). Both areas are taken over the sizes evaluated here (the default grid is 0.1 … 100 %).

# %%
sizes = (0.5, 1, 2, 5, 10, 20, 100)
curves = {label: circuits.faithfulness_curve(model, g, task, sizes=sizes, batch_size=16)
          for label, g in graphs.items()}

fig, ax = plt.subplots(figsize=(7, 4))
for label, curve in curves.items():
    ax.plot(curve.sizes, curve.faithfulness, "o-", label=f"{label} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})")
ax.axhline(1.0, color="grey", lw=0.5)
ax.set(xscale="log", xlabel="edges kept (%)", ylabel="normalised faithfulness",
       title=f"IOI on SmolLM2-135M, {len(task)} prompts")
ax.legend()
plt.show()
for label, curve in curves.items():
    print(label, [f"{s}%: {f:.2f}" for s, f in zip(curve.sizes, curve.faithfulness)])

# %% [markdown]
# ## Select a circuit
#
# From the GIM curve, the circuit smaller than the whole model with the highest faithfulness, selected exactly
# as the curve did (top edges by |score|, then pruning).

# %%
gim_curve = curves["EAP-IG + GIM"]
candidates = [(s, f) for s, f in zip(gim_curve.sizes, gim_curve.faithfulness) if s < 100]
size, faith = max(candidates, key=lambda sf: sf[1])
circuit = graph.copy().apply_topn(round(size / 100 * graph.n_valid_edges))
check = circuits.faithfulness(model, circuit, task, batch_size=16)  # one more exact patching run
print(f"{size}% of the edges -> {circuit.n_edges_in_graph} edges after pruning, "
      f"{int(circuit.nodes_in_graph.sum())} nodes; faithfulness {check:.3f} (curve: {faith:.3f})")
assert abs(check - faith) < 1e-3

# %% [markdown]
# ## Render it
#
# `save("….png")` draws with matplotlib (no Graphviz needed): nodes by layer, q/k/v edges coloured, width ∝ |score|,
# negative scores dashed. A few hundred edges stay readable, so we draw the 150 strongest.

# %%
png = circuit.save(out / "ioi_circuit.png", top_k=150, title="IOI circuit (EAP-IG + GIM), top 150 edges")
display(Image(filename=str(png)))

# %% [markdown]
# ## Export and read back
#
# GraphML opens in networkx, Gephi or yEd; the EAP-IG JSON is the format of the EAP-IG code and the MIB
# benchmark (k/v edges per query head). Both are views of the same two tensors and round-trip exactly.

# %%
graphml = circuit.save(out / "ioi_circuit.graphml", include="in_graph")
eap_json = circuit.save(out / "ioi_circuit_eap.json", format="eap-json")
print(graphml.name, graphml.stat().st_size, "bytes |", eap_json.name, eap_json.stat().st_size, "bytes")

again = circuits.Graph.load(eap_json, model=model).as_kv_edges("grouped")
assert torch.equal(again.in_graph, circuit.in_graph)

G = nx.read_graphml(graphml)
print(G.number_of_nodes(), "nodes,", G.number_of_edges(), "edges in the GraphML file")

# %% [markdown]
# ## The top heads
#
# A head's importance here: the summed |score| of its in-circuit edges, in and out. Name-mover heads in late
# layers and induction / duplicate-token heads in the middle layers are what the IOI literature finds in GPT-2;
# SmolLM2's circuit need not match it head for head.

# %%
importance = {}
for src, dst, data in G.edges(data=True):
    for node in (src, dst):
        if G.nodes[node].get("kind") == "attention":  # query heads; k/v inputs end at KV-group nodes
            importance[node] = importance.get(node, 0.0) + abs(float(data["score"]))
top = sorted(importance.items(), key=lambda kv: -kv[1])[:10]
for name, value in top:
    print(f"{name:>8}  {value:.3f}")

fig, ax = plt.subplots(figsize=(7, 3))
ax.bar([n for n, _ in top], [v for _, v in top])
ax.set(ylabel="Σ |edge score|", title="most important heads in the circuit")
plt.show()
