"""Scaling out: 2 processes (gloo) equal 1, chunked equals unchunked, bf16 accumulates in float32."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

import circuits
from circuits._engine.memory import estimate_memory, fit_batch_size, parse_bytes
from gimlens import GimlensError
from gimlens.testing import tiny_model
from helpers import free_port

ARGS = dict(arch="llama", scale=3.0, seed=5)


def _setup(dtype=torch.float32):
    model = tiny_model(**ARGS, dtype=dtype)
    task = circuits.tasks.make("ioi", model, n=10, seed=0)
    return model, task


def _worker(rank, size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        model, task = _setup()
        g = circuits.attribute(model, circuits.Graph.from_model(model), task, method="EAP-IG-inputs",
                               ig_steps=2, batch_size=3)
        g.apply_topn(40)
        per_example = circuits.evaluate(model, g, task, batch_size=4)
        torch.save({"scores": g.scores, "evaluate": per_example}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_scores_and_evaluation(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model, task = _setup()
    g = circuits.attribute(model, circuits.Graph.from_model(model), task, method="EAP-IG-inputs",
                           ig_steps=2, batch_size=3)
    g.apply_topn(40)
    single = circuits.evaluate(model, g, task, batch_size=4)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert_close(got["scores"], g.scores, rtol=1e-5, atol=1e-6)
        assert_close(got["evaluate"], single, rtol=1e-5, atol=1e-6)


def test_max_memory_splits_batches_and_gives_the_same_scores():
    model, task = _setup()
    graph = circuits.Graph.from_model(model)
    whole = circuits.attribute(model, graph.copy(), task).scores
    n_pos = task.clean.shape[1]
    budget = estimate_memory(model, graph, 3, n_pos).total  # room for 3 of the 10 examples
    assert fit_batch_size(model, graph, n_pos, budget) == 3
    chunked = circuits.attribute(model, graph.copy(), task, max_memory=budget).scores
    assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(GimlensError, match="max_memory"):
        circuits.attribute(model, graph.copy(), task, max_memory=1000)


def test_memory_sizes_parse():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes(4096) == 4096 and parse_bytes("512MiB") == 512 * 2**20
    for bad in ("lots", -1, 0, True):
        with pytest.raises(GimlensError):
            parse_bytes(bad)


def test_bf16_model_gives_float32_scores_close_to_the_float32_models():
    model32, task = _setup()
    model16, _ = _setup(torch.bfloat16)
    s32 = circuits.attribute(model32, circuits.Graph.from_model(model32), task).scores
    s16 = circuits.attribute(model16, circuits.Graph.from_model(model16), task).scores
    assert s16.dtype == torch.float32
    valid = circuits.Graph.from_model(model32).valid
    corr = torch.corrcoef(torch.stack([s32[valid], s16[valid]]))[0, 1]
    assert corr > 0.95
    assert ((s16 - s32)[valid].norm() / s32[valid].norm()) < 0.2


def test_discover_cli_under_torchrun_writes_the_single_process_circuit(tmp_path):
    import shutil
    import subprocess
    import sys

    from gimlens.testing import tiny_hf_model, tiny_tokenizer

    folder = tmp_path / "model"
    tiny_hf_model(**ARGS).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    exe = shutil.which("gimlens")
    assert exe, "the gimlens console script must be installed (pip install -e .)"
    args = ["discover", "--task", "ioi", "--model", str(folder), "--n-examples", "8", "--batch-size", "3",
            "--ig-steps", "2", "--edges", "40", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([exe, *args, "-o", str(one)], check=True, env=env, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--no-python", exe, *args, "-o", str(two)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = circuits.Graph.load(one), circuits.Graph.load(two)
    assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.in_graph, b.in_graph)
    assert not list(tmp_path.glob(".gimlens-*"))  # rank 1 staged nothing


PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The capital of France is",
           "Alice and Bob went to the park", "The capital of Italy is", "Then Anna said to"]


def _token_worker(rank, size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        import gimlens

        model = tiny_model(**ARGS)
        attr = gimlens.attribute(model, PROMPTS, method="integrated_gradients", steps=4, batch_size=2)
        faith = gimlens.evaluate.attribution_faithfulness(model, attr, max_k=3, batch_size=4)
        torch.save({"scores": attr.scores, "targets": attr.target_ids, "delta": attr.delta,
                    "comp": faith.comprehensiveness, "suff": faith.sufficiency}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_token_attribution_and_faithfulness_under_two_processes_equal_one(tmp_path):
    import gimlens

    mp.spawn(_token_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model = tiny_model(**ARGS)
    attr = gimlens.attribute(model, PROMPTS, method="integrated_gradients", steps=4, batch_size=2)
    faith = gimlens.evaluate.attribution_faithfulness(model, attr, max_k=3, batch_size=4)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["targets"], attr.target_ids)  # top predictions gathered back too
        assert_close(got["scores"], attr.scores, rtol=1e-5, atol=1e-6)
        assert_close(got["delta"], attr.delta, rtol=1e-4, atol=1e-6)
        assert_close(got["comp"], faith.comprehensiveness, equal_nan=True)
        assert_close(got["suff"], faith.sufficiency, equal_nan=True)
