"""Two processes under torchrun on CPU (gloo): one set of outputs, every eval image counted once."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from mergemix import cli


def test_torchrun_two_processes(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mergemix", "train", "--output", str(tmp_path), "--experiment", "ddp", "--epochs", "2",
         "--batch-size", "32", "--train-subset", "512", "--warmup-epochs", "0", "--model-ema", "--model-ema-decay", "0.9",
         "--model-kwargs", "patch_size=2", "embed_dim=32", "depth=2", "num_heads=2"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    run = tmp_path / "ddp"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert len(rows) == 2
    # the first epoch's train_loss is the mean over both processes' steps (their sums and counts added up):
    # near chance for MergeMix's two cross-entropies (mixed and clean), 2 ln 10, where one process's
    # count under both sums, or its sum over both counts, would double or halve it
    assert abs(float(rows[0]["train_loss"]) - 2 * math.log(10)) < 0.5, rows[0]
    assert done.stdout.count("final ") == 1  # rank 0 alone reports
    ckpt = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)
    gen = [r["generator"] for r in ckpt["rng"]]
    assert len(gen) == 2 and not torch.equal(gen[0], gen[1])  # each rank its own seed: different masks

    # each process evaluated its own shard; synced, the bins hold all 360 digits eval images once, and the
    # figures are those of one process evaluating the same weights alone
    assert sum(results["bins"]["count"]) == 360
    assert cli.main(["eval", "--checkpoint", str(run / "last.pth.tar"), "--output", str(tmp_path / "one")]) == 0
    alone = json.loads((tmp_path / "one" / "results.json").read_text())
    assert alone["num_images"] == 360 and results["bins"]["count"] == alone["bins"]["count"]
    for key in ("top1", "top5", "nll", "ece", "brier"):
        assert results[key] == pytest.approx(alone[key], abs=1e-6), key
    # so are the EMA's: every rank's EMA starts from the same weights (rank 0's) and follows the same updates
    assert cli.main(["eval", "--checkpoint", str(run / "last.pth.tar"), "--use-ema", "--output", str(tmp_path / "ema")]) == 0
    ema_alone = json.loads((tmp_path / "ema" / "results.json").read_text())
    for key in ("top1", "nll", "ece", "brier"):
        assert results["ema"][key] == pytest.approx(ema_alone[key], abs=1e-6), key

    # `mergemix eval` under torchrun shards the images too: counted once, one report, one writer
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mergemix", "eval", "--checkpoint", str(run / "last.pth.tar"), "--output", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results.json") == 1
    sharded = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sharded["bins"]["count"] == alone["bins"]["count"] and sum(sharded["bins"]["count"]) == 360
    for key in ("top1", "top5", "nll", "ece", "brier"):
        assert sharded[key] == pytest.approx(alone[key], abs=1e-6), key

    # an input error that only rank 0 can see (its run folder is taken) stops rank 1 too, with no traceback;
    # both raise it, and one process per machine prints it
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mergemix", "train", "--output", str(tmp_path), "--experiment", "ddp", "--epochs", "1",
         "--model-kwargs", "patch_size=2", "embed_dim=32", "depth=2", "num_heads=2"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("already holds a run") == 1 and "[rank 1]" not in done.stderr
    assert "Connection closed" not in done.stderr and "[rank1]: Traceback" not in done.stderr
