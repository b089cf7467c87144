"""Tiny random models for tests, docs and examples, built offline in well under a second.

Fifteen families, named by their HuggingFace `model_type` ([`FAMILIES`][gimlens.testing.FAMILIES]),
cover the cases GIM and edge attribution must handle:

- `"gpt2"`, `"opt"`: LayerNorm, learned positions, plain MLP.
- `"gpt_neox"` (Pythia): parallel attention and MLP, each on its own LayerNorm, partial RoPE.
- `"gptj"`, `"phi"` (Phi-1.5/2): parallel attention and MLP on *one* LayerNorm.
- `"llama"`, `"mistral"`, `"qwen2"` (Q/K/V biases), `"phi3"` (fused QKV and gate/up),
  `"stablelm"` (LayerNorm): RoPE, grouped KV heads, gated MLP.
- `"qwen3"`: as Llama with per-head RMSNorms on queries and keys.
- `"gemma"`: RMSNorm scaling by `1 + weight`, embeddings scaled by `sqrt(d_model)`.
- `"gemma2"`, `"gemma3"`: as Gemma with a norm after attention and after the MLP and
  soft-capped final logits (Gemma 2 also caps attention logits, Gemma 3 has q/k norms).
- `"olmo2"`: no pre-norms: a norm after each sublayer, q/k norms over all heads.

Families without grouped KV heads (GPT-2, GPT-NeoX, GPT-J, Phi, OPT) ignore `n_kv_heads`.

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
from typing import Callable, Literal

import torch

__all__ = ["FAMILIES", "tiny_model", "tiny_hf_model", "tiny_tokenizer", "TINY_NAMES"]

Arch = Literal["gpt2", "gpt_neox", "gptj", "phi", "phi3", "llama", "mistral", "qwen2", "qwen3",
               "gemma", "gemma2", "gemma3", "olmo2", "opt", "stablelm"]

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


def _decoder(d_model: int, n_heads: int, n_kv_heads: int, d_mlp: int, n_layers: int, **extra):
    """Keyword arguments of a Llama-style config (`head_dim` written out: Gemma's default is 256)."""
    return dict(vocab_size=_VOCAB_SIZE, hidden_size=d_model, intermediate_size=d_mlp,
                num_hidden_layers=n_layers, num_attention_heads=n_heads,
                num_key_value_heads=n_kv_heads, head_dim=d_model // n_heads,
                max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=None,
                tie_word_embeddings=False, **extra)


def _mha(d_model: int, n_heads: int, n_kv_heads: int, d_mlp: int, n_layers: int, **extra):
    """As `_decoder` for families without grouped KV heads."""
    kw = _decoder(d_model, n_heads, n_heads, d_mlp, n_layers, **extra)
    del kw["num_key_value_heads"], kw["head_dim"]
    return kw


def _gpt2(d_model, n_heads, n_kv_heads, d_mlp, n_layers):
    return dict(vocab_size=_VOCAB_SIZE, n_positions=128, n_embd=d_model, n_layer=n_layers,
                n_head=n_heads, n_inner=d_mlp, bos_token_id=0, eos_token_id=0)


def _gptj(d_model, n_heads, n_kv_heads, d_mlp, n_layers):
    return dict(vocab_size=_VOCAB_SIZE, n_positions=128, n_embd=d_model, n_layer=n_layers,
                n_head=n_heads, n_inner=d_mlp, rotary_dim=max(2, d_model // n_heads // 2),
                bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)


def _opt(d_model, n_heads, n_kv_heads, d_mlp, n_layers):
    return dict(vocab_size=_VOCAB_SIZE, hidden_size=d_model, ffn_dim=d_mlp,
                num_hidden_layers=n_layers, num_attention_heads=n_heads,
                max_position_embeddings=128, word_embed_proj_dim=d_model, bos_token_id=0,
                eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)


def _gemma2(*args):
    # Gemma 2's attention logit soft-capping (50) is kept; the final cap is lowered from 30 so
    # that it visibly bends the tiny model's logits
    return _decoder(*args, query_pre_attn_scalar=args[0] // args[1], final_logit_softcapping=5.0)


def _gemma3(*args):
    return _decoder(*args, query_pre_attn_scalar=args[0] // args[1], final_logit_softcapping=5.0)


#: family -> (transformers config class, model class, config keywords from
#: `(d_model, n_heads, n_kv_heads, d_mlp, n_layers)`).
FAMILIES: dict[str, tuple[str, str, Callable[..., dict]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _gpt2),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", lambda *a: _mha(*a, rotary_pct=0.5)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", _gptj),
    "phi": ("PhiConfig", "PhiForCausalLM", _mha),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _decoder),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _decoder),
    "mistral": ("MistralConfig", "MistralForCausalLM", _decoder),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _decoder),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _decoder),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _decoder),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _gemma2),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", _gemma3),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _decoder),
    "opt": ("OPTConfig", "OPTForCausalLM", _opt),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _decoder),
}


def _hf_model(arch: str, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, d_mlp: int):
    if arch not in FAMILIES:
        from .errors import GimlensError

        raise GimlensError(f"unknown tiny architecture {arch!r}; expected one of {sorted(FAMILIES)}")
    import transformers

    config_name, model_name, keywords = FAMILIES[arch]
    config = getattr(transformers, config_name)(**keywords(d_model, n_heads, n_kv_heads, d_mlp, n_layers))
    return getattr(transformers, model_name)(config)


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
        arch: a family of [`FAMILIES`][gimlens.testing.FAMILIES], e.g. `"gpt2"` (LayerNorm),
            `"llama"` (RMSNorm, RoPE, GQA, gated MLP) or `"gemma2"` (post-norms, soft-capping).
        **kwargs: `n_layers`, `d_model`, `n_heads`, `n_kv_heads` (ignored by families without
            grouped KV heads),
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
