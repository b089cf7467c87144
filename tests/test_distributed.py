"""gimlens.distributed on 2 CPU processes (gloo) against the single-process result."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gimlens import distributed as gd
from helpers import free_port


def _worker(rank, size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        data = torch.arange(11, dtype=torch.float32)
        mine = gd.shard_range(11)
        rows = data[mine.start:mine.stop] * 2
        total = gd.all_reduce_sum(rows.sum().reshape(1).clone())
        gathered = gd.all_gather_rows(rows[:, None])
        torch.save({"range": (mine.start, mine.stop), "total": total, "gathered": gathered,
                    "main": gd.is_main_process()}, os.path.join(out, f"{rank}.pt"))
        gd.barrier()
    finally:
        dist.destroy_process_group()


def test_single_process_is_the_identity():
    assert gd.world() == (0, 1) and gd.is_main_process()
    assert gd.shard_range(7) == range(7)
    t = torch.ones(3)
    assert gd.all_reduce_sum(t) is t and torch.equal(t, torch.ones(3))
    assert torch.equal(gd.all_gather_rows(t), t)


def test_two_processes_shard_contiguously_and_reduce_to_the_single_process_result(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["range"] == (0, 6) and r1["range"] == (6, 11)
    expected = torch.arange(11, dtype=torch.float32) * 2
    for r in (r0, r1):
        assert float(r["total"]) == float(expected.sum())
        assert torch.equal(r["gathered"][:, 0], expected)
    assert r0["main"] and not r1["main"]
