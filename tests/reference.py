"""An independent reference: the tiny models' forward pass written out in plain PyTorch from the
HuggingFace weights, with GIM's rules inserted as custom autograd functions written here (the
softmax rule through an explicit Jacobian matrix, not gimlens's formula).

``reference_forward(hf, embeds, rules)`` returns logits; gradients w.r.t. ``embeds`` (the token
embeddings, before GPT-2's position embedding is added) are compared with gimlens's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rules:
    freeze_norm: bool = False
    temperature: float | None = None
    q: float | None = None
    k: float | None = None
    v: float | None = None
    gate: float | None = None
    up: float | None = None


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.c, None


def _scale(x, c):
    return x if c is None else _Scale.apply(x, c)


class _JacobianSoftmax(torch.autograd.Function):
    """Forward: softmax(s). Backward: J_T g with J_T = diag(s_T) - s_T s_T^T, s_T = softmax(s/T)."""

    @staticmethod
    def forward(ctx, s, T):
        ctx.save_for_backward(s)
        ctx.T = T
        return torch.softmax(s, dim=-1)

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        p = torch.softmax(s / ctx.T, dim=-1)
        jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return (jac @ g.unsqueeze(-1)).squeeze(-1), None


def _softmax(s, T):
    return torch.softmax(s, dim=-1) if T is None else _JacobianSoftmax.apply(s, T)


def _layer_norm(x, w, b, eps, freeze):
    xc = x - x.mean(-1, keepdim=True)
    sigma = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if freeze:
        sigma = sigma.detach()
    return xc / sigma * w + b


def _rms_norm(x, w, eps, freeze):
    rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if freeze:
        rms = rms.detach()
    return x / rms * w


def _causal_scores(q, k):
    # q: [B, H, S, dh], k: [B, H, S, dh]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = s.shape[-1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return s.masked_fill(~mask, torch.finfo(s.dtype).min)


def _gpt2(hf, emb, r: Rules):
    tr = hf.transformer
    B, S, d = emb.shape
    H = hf.config.n_head
    dh = d // H
    x = emb + tr.wpe.weight[:S]
    eps = hf.config.layer_norm_epsilon
    for blk in tr.h:
        h = _layer_norm(x, blk.ln_1.weight, blk.ln_1.bias, eps, r.freeze_norm)
        qkv = h @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
        q, k, v = (t.reshape(B, S, H, dh) for t in qkv.split(d, dim=-1))
        q, k, v = _scale(q, r.q), _scale(k, r.k), _scale(v, r.v)
        pattern = _softmax(_causal_scores(q.transpose(1, 2), k.transpose(1, 2)), r.temperature)
        z = (pattern @ v.transpose(1, 2)).transpose(1, 2).reshape(B, S, d)
        x = x + z @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        h = _layer_norm(x, blk.ln_2.weight, blk.ln_2.bias, eps, r.freeze_norm)
        pre = h @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias  # plain MLP: never scaled
        x = x + F.gelu(pre, approximate="tanh") @ blk.mlp.c_proj.weight + blk.mlp.c_proj.bias
    x = _layer_norm(x, tr.ln_f.weight, tr.ln_f.bias, eps, r.freeze_norm)
    return x @ hf.lm_head.weight.T


def _rope(x, theta):
    # x: [B, S, H, dh], HF's rotate-half convention
    S, dh = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = torch.arange(S, dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)[None, :, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return x * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()


def _llama(hf, emb, r: Rules):
    cfg = hf.config
    B, S, d = emb.shape
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = d // H
    theta = cfg.rope_parameters["rope_theta"]
    eps = cfg.rms_norm_eps

    def lin(m, t):
        return F.linear(t, m.weight, m.bias)

    x = emb
    for layer in hf.model.layers:
        at = layer.self_attn
        h = _rms_norm(x, layer.input_layernorm.weight, eps, r.freeze_norm)
        q = _scale(lin(at.q_proj, h).reshape(B, S, H, dh), r.q)
        k = _scale(lin(at.k_proj, h).reshape(B, S, Hkv, dh), r.k)
        v = _scale(lin(at.v_proj, h).reshape(B, S, Hkv, dh), r.v)
        q, k = _rope(q, theta), _rope(k, theta)
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
        pattern = _softmax(_causal_scores(q.transpose(1, 2), k.transpose(1, 2)), r.temperature)
        z = (pattern @ v.transpose(1, 2)).transpose(1, 2).reshape(B, S, d)
        x = x + lin(at.o_proj, z)
        h = _rms_norm(x, layer.post_attention_layernorm.weight, eps, r.freeze_norm)
        gate = _scale(lin(layer.mlp.gate_proj, h), r.gate)
        up = _scale(lin(layer.mlp.up_proj, h), r.up)
        x = x + lin(layer.mlp.down_proj, F.silu(gate) * up)
    x = _rms_norm(x, hf.model.norm.weight, eps, r.freeze_norm)
    return lin(hf.lm_head, x)


def reference_forward(hf, embeds: torch.Tensor, rules: Rules) -> torch.Tensor:
    """Logits ``[batch, pos, vocab]`` of ``hf`` for token embeddings ``embeds``."""
    if hf.config.model_type == "gpt2":
        return _gpt2(hf, embeds, rules)
    return _llama(hf, embeds, rules)


def token_embeddings(hf, tokens: torch.Tensor) -> torch.Tensor:
    return hf.get_input_embeddings().weight[tokens]
