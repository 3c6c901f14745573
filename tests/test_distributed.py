"""The small collectives the training loop relies on, across two gloo processes on CPU."""
from __future__ import annotations

import datetime
import json
import multiprocessing as mp

import torch
import torch.distributed as dist

from mergemix import distributed
from mergemix.errors import ConfigError


def _collectives(rank: int, init_file: str, out_file: str) -> None:
    """Join a two-process gloo group, run each collective on this rank's own values, write what came back."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    ctx = distributed.Context(rank, 2, torch.device("cpu"))
    try:
        out = {
            "sums": distributed.sums([rank + 1.0, 10.0 * (rank + 1)], ctx),
            "any_true": distributed.any_true([rank == 0, False, True], ctx),
            "gather": distributed.gather({"rank": rank}, ctx),
            "on_main": distributed.on_main(lambda: "rank 0's result", ctx, "compute"),
        }

        def fails() -> None:
            raise ConfigError("bad input rank 0 found")
        try:
            distributed.on_main(fails, ctx, "check the input")
        except ConfigError as e:
            out["error"] = str(e)
        with open(out_file, "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_collectives_across_two_processes(tmp_path):
    init, outs = str(tmp_path / "init"), [tmp_path / f"rank{r}.json" for r in range(2)]
    other = mp.get_context("spawn").Process(target=_collectives, args=(1, init, str(outs[1])))
    other.start()
    try:
        _collectives(0, init, str(outs[0]))
    finally:
        other.join(timeout=120)
        if other.is_alive():  # hung in a collective: leave no process behind
            other.kill()
            other.join()
    assert other.exitcode == 0
    rank0, rank1 = (json.loads(p.read_text()) for p in outs)
    for out in (rank0, rank1):
        assert out["sums"] == [3.0, 30.0]  # 1 + 2 and 10 + 20, the same on both
        assert out["any_true"] == [True, False, True]
        assert out["gather"] == [{"rank": 0}, {"rank": 1}]
    assert rank0["on_main"] == "rank 0's result" and rank1["on_main"] is None
    # rank 0's error reaches rank 1 too, which names what rank 0 failed to do instead of hanging
    assert rank0["error"] == "bad input rank 0 found"
    assert rank1["error"] == "rank 0 could not check the input (its error says why)"


def test_one_process_collectives_touch_no_process_group():
    ctx = distributed.Context(0, 1, torch.device("cpu"))
    assert not dist.is_initialized()
    assert distributed.sums([1.5, 2.0], ctx) == [1.5, 2.0]
    assert distributed.any_true([False, True], ctx) == [False, True]
    assert distributed.gather("x", ctx) == ["x"]
    assert distributed.on_main(lambda: 7, ctx, "compute") == 7
