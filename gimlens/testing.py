"""Tiny random models for tests, docs and examples, built offline in well under a second.

Three architectures cover the cases GIM and edge attribution must handle:

- `"gpt2"`: LayerNorm, learned positions, plain GELU MLP, fused QKV.
- `"llama"`: RMSNorm, RoPE, grouped KV heads, gated (SiLU) MLP.
- `"qwen2"`: as `"llama"` with Q/K/V biases.

All share a small byte-level BPE tokenizer trained on a built-in corpus (names, places and the
IOI template words are single tokens), so string inputs and baseline inference work as on a
real model.

Examples:
    >>> from gimlens.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> model(model.to_tokens("When Mary and John went to the store")).shape[-1]
    512
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from typing import Literal

import torch

__all__ = ["tiny_model", "tiny_hf_model", "tiny_tokenizer", "TINY_NAMES"]

Arch = Literal["gpt2", "llama", "qwen2"]

#: Names that are single tokens for `tiny_tokenizer` (with a leading space).
TINY_NAMES = (
    "Mary John Alice Bob Tom James Sarah Anna David Paul Emma Lucy Mark Kate Peter Laura".split()
)
_WORDS = (
    "the a of and to in is was on for at with store park school garden restaurant house office "
    "went gave drink book ball bone kiss ring necklace snack capital France Paris Germany Berlin "
    "Italy Rome Spain Madrid Japan Tokyo city country when then after while had decided Then "
    "When After While The of is was year war lasted from 17 18 19 20 21 the answer"
).split()
_VOCAB_SIZE = 512


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(_WORDS + list(TINY_NAMES))] * 30
    corpus += [
        f"When {a} and {b} went to the store, {b} gave a drink to {a}"
        for a in TINY_NAMES
        for b in TINY_NAMES
        if a != b
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    folder = os.path.join(tempfile.gettempdir(), f"gimlens-tiny-tokenizer-{os.getpid()}")
    fast.save_pretrained(folder)
    return folder


def tiny_tokenizer():
    """The byte-level BPE tokenizer of the tiny models (vocabulary of 512), loaded from a folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_dir())


def _hf_model(arch: Arch, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, d_mlp: int):
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=_VOCAB_SIZE,
            n_positions=128,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    common = dict(
        vocab_size=_VOCAB_SIZE,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common))
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common))
    from .errors import GimlensError

    raise GimlensError(f"unknown tiny architecture {arch!r}; expected 'gpt2', 'llama' or 'qwen2'")


def tiny_hf_model(
    arch: Arch = "llama",
    *,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
):
    """The HuggingFace model that `tiny_model` boots with the same arguments (eval mode)."""
    d_mlp = d_mlp if d_mlp is not None else 4 * d_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = _hf_model(arch, n_layers, d_model, n_heads, n_kv_heads, d_mlp)
        if scale != 1.0:
            with torch.no_grad():
                for p in hf.parameters():
                    if p.ndim == 2:
                        p.mul_(scale)
                    else:
                        # randomise norm gains and biases so nothing is trivially 1 or 0
                        p.add_(0.1 * torch.randn_like(p))
    return hf.to(dtype).eval()


def tiny_model(arch: Arch = "llama", **kwargs):
    """A randomly initialised TransformerBridge with the tiny tokenizer, booted offline.

    Args:
        arch: `"gpt2"` (LayerNorm), `"llama"` (RMSNorm, RoPE, GQA, gated MLP) or `"qwen2"`.
        **kwargs: `n_layers`, `d_model`, `n_heads`, `n_kv_heads` (ignored for GPT-2),
            `d_mlp`, `seed`, `dtype`, and `scale`, which multiplies every weight matrix
            (and jitters norm gains and biases) so that attention patterns and norms are far from
            uniform and every GIM rule visibly acts.

    Returns:
        A `TransformerBridge` in eval mode.
    """
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = tiny_hf_model(arch, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = build_bridge_from_module(
            hf, type(hf).__name__, hf_config=hf.config, tokenizer=tiny_tokenizer()
        )
    bridge.eval()
    return bridge
