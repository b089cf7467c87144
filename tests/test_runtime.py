"""The shared runtime layer: hooked runs, model preparation, validation, atomic writes."""

from __future__ import annotations

import os
import stat
from enum import Enum

import pytest
import torch

from gimlens.errors import GimlensError
from gimlens.runtime import (atomic_write, check_tokens, coerce_enum, format_bytes, parse_bytes,
                             prepared, require_lens_model, run_hooked)


def _hook_count(model) -> int:
    return sum(len(h._forward_hooks) + len(h._backward_hooks) for h in model.hook_dict.values())


def test_run_hooked_removes_hooks_after_success_and_error(gpt2_model):
    before = _hook_count(gpt2_model)
    tokens = torch.tensor([[1, 2, 3]])
    seen = []
    logits = run_hooked(gpt2_model, tokens, fwd_hooks=[("hook_embed", lambda t, hook: seen.append(1))])
    torch.testing.assert_close(logits, gpt2_model(tokens))
    assert seen == [1] and _hook_count(gpt2_model) == before

    def boom(t, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_hooked(gpt2_model, tokens, fwd_hooks=[("blocks.0.hook_mlp_out", boom)])
    assert _hook_count(gpt2_model) == before


def test_prepared_restores_modes_and_flags_after_an_exception(gpt2_model):
    gpt2_model.train()
    first = next(gpt2_model.parameters())
    flags = [p.requires_grad for p in gpt2_model.parameters()]
    first.requires_grad_(not flags[0])
    try:
        with pytest.raises(KeyError):
            with prepared(gpt2_model):
                assert not gpt2_model.training
                assert not any(p.requires_grad for p in gpt2_model.parameters())
                raise KeyError("x")
        assert gpt2_model.training and all(m.training for m in gpt2_model.modules())
        assert first.requires_grad is (not flags[0])
        assert [p.requires_grad for p in gpt2_model.parameters()][1:] == flags[1:]
    finally:
        first.requires_grad_(flags[0])
        gpt2_model.eval()


def test_require_lens_model_names_the_type():
    with pytest.raises(GimlensError, match="TransformerLens model.*Linear"):
        require_lens_model(torch.nn.Linear(2, 2))


class _Colour(str, Enum):
    RED = "red"


def test_coerce_enum_accepts_values_and_names_the_known_ones():
    assert coerce_enum(_Colour, "red", "colour") is _Colour.RED
    assert coerce_enum(_Colour, _Colour.RED, "colour") is _Colour.RED
    with pytest.raises(GimlensError, match=r"unknown colour 'blue'; expected one of 'red'"):
        coerce_enum(_Colour, "blue", "colour")


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "torch.Tensor"), (torch.tensor([0.5]), "integer token ids"),
    (torch.zeros(1, 0, dtype=torch.long), "shape"), (torch.tensor([[10**6]]), "vocabulary"),
    (torch.tensor([[-1]]), "vocabulary"),
])
def test_check_tokens_refuses_bad_tokens(gpt2_model, bad, match):
    with pytest.raises(GimlensError, match=match):
        check_tokens(bad, gpt2_model, "clean")


def test_check_tokens_keeps_2d_only_when_asked(gpt2_model):
    assert check_tokens(torch.tensor([1, 2]), gpt2_model).shape == (1, 2)
    with pytest.raises(GimlensError, match="shape"):
        check_tokens(torch.tensor([1, 2]), gpt2_model, allow_1d=False)


def test_atomic_write_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "a.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert p.read_bytes() == b"\x00\x01"


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def fail(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(GimlensError, match="cannot write .*a.txt.*disk full"):  # names the path
        atomic_write(p, fail)
    assert p.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_atomic_write_refuses_a_missing_folder(tmp_path):
    with pytest.raises(GimlensError, match="does not exist"):
        atomic_write(tmp_path / "no" / "a.txt", "x")


def test_parse_and_format_bytes():
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(7) == 7
    assert format_bytes(1536) == "1.5 KiB"
    for bad in ("lots", 0, -3, True, "0GB"):
        with pytest.raises(GimlensError, match="max_memory"):
            parse_bytes(bad)
