"""The engine: resume after a kill or a signal ends where an uninterrupted run ends; NaN stops cleanly."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mergemix import checkpoint, cli, mix
from mergemix import train as train_module
from mergemix.mix import accepted_options
from mergemix.mix.plain import NoMix

TINY = ["--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2", "--warmup-epochs", "0",
        "--deterministic", "--log-interval", "1"]
SHORT = ["--epochs", "3", "--batch-size", "32", "--train-subset", "256"]  # 8 steps an epoch


def command(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mergemix", "train", "--output", str(out), "--experiment", name, *TINY, *extra]


def summary(run: Path) -> list[dict[str, str]]:
    """summary.csv rows without the wall-clock column."""
    return [{k: v for k, v in row.items() if k != "epoch_time"} for row in csv.DictReader((run / "summary.csv").open())]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run (MergeMix). Runs below that match it also show: same seed, same summary."""
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(command(out, "full", *SHORT), check=True, capture_output=True)
    return out / "full"


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(reference, tmp_path):
    proc = subprocess.Popen(command(tmp_path, "killed", *SHORT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(tmp_path / "killed" / checkpoint.LAST, proc)
    proc.kill()  # in the epoch after the first checkpoint
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    proc.wait()
    ckpt = checkpoint.load(tmp_path / "killed" / checkpoint.LAST)  # the last good one still loads
    assert ckpt["epoch"] in (0, 1, 2)
    done = subprocess.run(command(tmp_path, "killed", *SHORT, "--resume",
                                  str(tmp_path / "killed")), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert summary(tmp_path / "killed") == summary(reference)
    resumed, full = (json.loads((r / "results.json").read_text()) for r in (tmp_path / "killed", reference))
    assert (resumed["top1"], resumed["ece"]) == (full["top1"], full["ece"])
    for run in (reference, tmp_path / "killed"):
        assert_best_is_the_top1_peak(run)
    # model_best holds the peak epoch's weights: evaluated, it gives that epoch's summary.csv figures
    rows = summary(tmp_path / "killed")
    peak = max(rows, key=lambda r: float(r["eval_top1"]))  # max() keeps the first of equal ones
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "killed" / checkpoint.BEST),
                     "--output", str(tmp_path / "eval-best")]) == 0
    evaluated = json.loads((tmp_path / "eval-best" / "results.json").read_text())
    assert evaluated["epoch"] == int(peak["epoch"])
    for key, column in (("top1", "eval_top1"), ("nll", "eval_loss"), ("ece", "eval_ece")):
        assert evaluated[key] == pytest.approx(float(peak[column]), abs=1e-6), key


def assert_best_is_the_top1_peak(run: Path) -> None:
    """model_best.pth.tar and results.json name the first epoch of highest top-1 in summary.csv."""
    top1 = [float(r["eval_top1"]) for r in summary(run)]
    peak = top1.index(max(top1))
    best = checkpoint.load(run / checkpoint.BEST)
    assert (best["epoch"], best["metric"]) == (peak, max(top1)), (best["epoch"], top1)
    results = json.loads((run / "results.json").read_text())
    assert (results["best_epoch"], results["best_top1"]) == (peak, max(top1))


def test_sigint_writes_a_resumable_checkpoint(reference, tmp_path):
    run = tmp_path / "stopped"
    proc = subprocess.Popen(command(tmp_path, "stopped", *SHORT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(run / checkpoint.LAST, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "stopped by SIGINT; resume with: mergemix train --resume" in err
    assert not (run / "results.json").exists()
    # resume with the run's own args.yaml as the recipe: no flags needed but the checkpoint
    done = subprocess.run([sys.executable, "-m", "mergemix", "train", "--resume", str(run / checkpoint.LAST)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert summary(run) == summary(reference)


class SigtermAtCall(NoMix):
    """Plain CE that sends its own process SIGTERM at the ``at``-th call."""

    name = "sigterm_test"
    at, calls = 0, 0

    def __call__(self, model, x, y):
        SigtermAtCall.calls += 1
        if SigtermAtCall.calls == SigtermAtCall.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(model, x, y)


def test_a_stop_at_the_last_step_finishes_the_run(tmp_path, monkeypatch, capsys):
    """The last epoch is saved as ended: with nothing left to resume, the run writes its results."""
    monkeypatch.setitem(mix._REGISTRY, SigtermAtCall.name, SigtermAtCall)
    monkeypatch.setattr(SigtermAtCall, "at", 16)  # the last of 2 epochs x 8 steps
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "s", *TINY, "--mix", SigtermAtCall.name,
                     "--epochs", "2", "--batch-size", "32", "--train-subset", "256"]) == 0
    assert "the stop came as the last epoch ended" in capsys.readouterr().out
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert results["epochs"] == 2 and len(summary(tmp_path / "s")) == 2
    assert (tmp_path / "s" / "reliability.png").exists()


class FirstDraw(NoMix):
    """Plain CE that records the first number its generator gives in each run."""

    name = "first_draw_test"
    draws: list[int] = []

    def __call__(self, model, x, y):
        if not getattr(self, "drawn", False):  # one objective per run
            self.drawn = True
            FirstDraw.draws.append(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        return super().__call__(model, x, y)


def test_resume_with_another_process_count_does_not_repeat_the_first_draws(tmp_path, monkeypatch, capsys):
    """The random streams restart from the seed moved on by the steps done, the objective's generator
    (partners, λ, masks) as the global ones: from the plain seed, they would replay epoch 0's mixing."""
    monkeypatch.setitem(mix._REGISTRY, FirstDraw.name, FirstDraw)
    monkeypatch.setattr(FirstDraw, "draws", [])

    def train(*extra: str) -> int:
        return cli.main(["train", "--output", str(tmp_path), *TINY, "--mix", FirstDraw.name, "--batch-size", "32",
                         "--train-subset", "128", "--seed", "3", *extra])

    assert train("--experiment", "r", "--epochs", "1") == 0
    ckpt = torch.load(tmp_path / "r" / "last.pth.tar", map_location="cpu", weights_only=True)
    ckpt.update(rng=ckpt["rng"] * 2, partial=ckpt["partial"] * 2)  # as two processes write it
    checkpoint.save(ckpt, tmp_path / "r" / "last.pth.tar")
    assert train("--resume", str(tmp_path / "r"), "--epochs", "2") == 0
    assert "written by 2 process(es), this run has 1; random streams restart" in capsys.readouterr().out
    def first_draw(seed: int) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))

    expected = first_draw(int(np.random.SeedSequence([3, 0, 4]).generate_state(1)[0]))  # seed 3, rank 0, 4 steps done
    assert FirstDraw.draws[1] != FirstDraw.draws[0] and FirstDraw.draws[1] == expected
    assert FirstDraw.draws[1] != first_draw(3 + 4)  # seed + steps would replay a fresh run of seed 7


def test_resume_inside_an_epoch_with_another_process_count_keeps_the_epochs_loss_so_far(tmp_path):
    """The checkpoint's per-rank loss sums and time of the epoch so far count in its row, however many
    processes wrote them: the row's loss is every step's mean."""
    def train(*extra: str) -> int:
        return cli.main(["train", "--output", str(tmp_path), *TINY, "--mix", "none", "--batch-size", "32",
                         "--train-subset", "128", *extra])

    rows = {}
    for name, partial in [("none", [{"loss_sum": 0.0, "loss_count": 0, "epoch_time": 0.0}] * 2),
                          ("two", [{"loss_sum": 10.0, "loss_count": 2, "epoch_time": 50.0},
                                   {"loss_sum": 30.0, "loss_count": 2, "epoch_time": 60.0}])]:
        assert train("--experiment", name, "--epochs", "1") == 0  # 4 steps an epoch
        ckpt = torch.load(tmp_path / name / "last.pth.tar", map_location="cpu", weights_only=True)
        # as two processes would write it 2 steps into epoch 1
        ckpt.update(epoch=0, step=2, global_step=6, rng=ckpt["rng"] * 2, partial=partial)
        checkpoint.save(ckpt, tmp_path / name / "last.pth.tar")
        assert train("--resume", str(tmp_path / name), "--epochs", "2") == 0
        rows[name] = list(csv.DictReader((tmp_path / name / "summary.csv").open()))[-1]
    own = 2 * float(rows["none"]["train_loss"])  # the 2 steps after the resume, the same draws in both
    assert float(rows["two"]["train_loss"]) == pytest.approx((40.0 + own) / 6, rel=1e-5)
    assert float(rows["two"]["epoch_time"]) > 60.0 > float(rows["none"]["epoch_time"])


def test_process_seeds_are_the_seed_on_rank_0_and_repeat_no_other_seeds_streams():
    from mergemix.distributed import process_seed

    seeds = [process_seed(seed, rank) for seed in range(20) for rank in range(4)]
    assert [process_seed(seed, 0) for seed in range(20)] == list(range(20))  # one process: the seed's draws
    assert len(set(seeds)) == 80  # seed + rank gave 23 values: rank 1 of seed 0 drew rank 0 of seed 1's


def test_the_largest_seed_trains(tmp_path):
    """The epoch's loader seed (the process's seed x 100003 + epoch) overflowed torch's 64 bits."""
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "big", *TINY, "--epochs", "1",
                     "--batch-size", "32", "--train-subset", "64", "--seed", str(2**63 - 1 - 2**31)]) == 0


def test_a_kill_between_the_last_and_the_best_checkpoint_loses_no_best_checkpoint(tmp_path):
    """_save writes last.pth.tar, then model_best.pth.tar: a run killed between the two, resumed in its
    folder, gets its best epoch's checkpoint back from last.pth.tar (a learning rate of 1e-12 leaves
    the weights as they were, so no later epoch beats it and writes one)."""
    def train(*extra: str) -> int:
        return cli.main(["train", "--output", str(tmp_path), *TINY, "--mix", "none", "--batch-size", "32",
                         "--train-subset", "64", "--lr", "1e-12", "--min-lr", "1e-12", *extra])

    assert train("--experiment", "r", "--epochs", "2") == 0
    run = tmp_path / "r"
    last = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)
    last["best"] = {"top1": last["metric"], "epoch": last["epoch"]}  # its epoch was the best one ...
    checkpoint.save(last, run / "last.pth.tar")
    (run / "model_best.pth.tar").unlink()  # ... and the kill came before its model_best.pth.tar
    assert train("--resume", str(run), "--epochs", "3") == 0
    best = torch.load(run / "model_best.pth.tar", map_location="cpu", weights_only=True)
    assert best["epoch"] == last["epoch"] == json.loads((run / "results.json").read_text())["best_epoch"]


class NaNAfter(NoMix):
    """Plain CE whose loss turns NaN at the 15th call (epoch 1, step 3 with 12 steps an epoch)."""

    name = "nan_test"
    calls = 0

    def __call__(self, model, x, y):
        out = super().__call__(model, x, y)
        NaNAfter.calls += 1
        if NaNAfter.calls >= 15:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(mix._REGISTRY, "nan_test", NaNAfter)
    argv = ["train", "--output", str(tmp_path), "--experiment", "nan", "--mix", "nan_test", "--epochs", "3",
            "--batch-size", "112", *TINY]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss at epoch 1 step 2" in err[0], err
    ckpt = checkpoint.load(tmp_path / "nan" / checkpoint.LAST)
    assert ckpt["epoch"] == 0 and torch.isfinite(ckpt["state_dict"]["head.weight"]).all()
    assert not (tmp_path / "nan" / "results.json").exists()


def test_accepted_options_follow_the_init_chain():
    assert {"alpha", "merge_num", "lam_policy", "smoothing", "generator"} <= set(accepted_options(mix.get_class("mergemix")))
    assert accepted_options(NoMix) == ["num_classes", "smoothing", "generator"]


def test_a_method_whose_init_passes_keywords_on_takes_its_bases_options_too(monkeypatch):
    """``def __init__(self, num_classes, depth=1, **kwargs)`` handing kwargs to its base: --smoothing
    reaches the base, --merge-num (taken by neither) is reported unused, a foreign --mix-opt refused."""
    from mergemix.config import parse_train_args
    from mergemix.errors import ConfigError
    from mergemix.train import build_objective

    class PassesOn(NoMix):
        name = "passes_on_test"

        def __init__(self, num_classes: int, depth: int = 1, **kwargs):
            super().__init__(num_classes, **kwargs)
            self.depth = depth

    monkeypatch.setitem(mix._REGISTRY, PassesOn.name, PassesOn)
    assert accepted_options(PassesOn) == ["num_classes", "depth", "smoothing", "generator"]  # its own first
    args = parse_train_args(["--mix", PassesOn.name, "--smoothing", "0.2", "--merge-num", "4", "--mix-opt", "depth=3"])
    objective, unused = build_objective(args, 10, torch.Generator())
    assert (objective.smoothing, objective.depth, unused) == (0.2, 3, {"merge_num": 4})
    with pytest.raises(ConfigError, match="has no option width"):
        build_objective(parse_train_args(["--mix", PassesOn.name, "--mix-opt", "width=3"]), 10, torch.Generator())


def test_compiled_mergemix_run_matches_the_eager_run(tmp_path):
    """--compile-mode goes through torch.compile (inductor on this CPU; CUDA-graph replay, the
    point of reduce-overhead, exists only on a GPU) and trains to the eager run's figures."""
    one_epoch = ["--epochs", "1", "--batch-size", "32", "--train-subset", "64"]
    for name, extra in (("eager", []), ("compiled", ["--compile-mode", "reduce-overhead"])):
        done = subprocess.run(command(tmp_path, name, *one_epoch, *extra), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    eager, compiled = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("eager", "compiled"))
    assert "compile: true" in (tmp_path / "compiled" / "args.yaml").read_text()
    assert compiled["nll"] == pytest.approx(eager["nll"], rel=1e-3)
    assert compiled["top1"] == pytest.approx(eager["top1"], abs=0.5)


def test_schedule_notes_flag_likely_mistakes_only():
    from mergemix.config import parse_train_args
    from mergemix.train import schedule_notes

    assert schedule_notes(parse_train_args(["--epochs", "10", "--warmup-epochs", "3"])) == []
    notes = schedule_notes(parse_train_args(["--epochs", "3", "--warmup-epochs", "3", "--lr", "1e-5",
                                             "--min-lr", "1e-4"]))
    assert len(notes) == 2
    assert notes[0].startswith("--min-lr 0.0001 is above --lr 1e-05")
    assert notes[1].startswith("--warmup-epochs 3 >= --epochs 3")
    assert schedule_notes(parse_train_args(["--sched", "none", "--epochs", "3"])) == [
        "--sched none trains at --lr throughout, as timm's does: --warmup-epochs 3 is not applied "
        "(--sched constant warms up, then holds --lr)"]
    assert schedule_notes(parse_train_args(["--epochs", "4", "--warmup-epochs", "0", "--mixup-off-epoch", "3"])) == []
    assert schedule_notes(parse_train_args(["--epochs", "1", "--warmup-epochs", "0", "--mixup-off-epoch", "5"])) == [
        "--mixup-off-epoch 5 >= --epochs 1: the run ends before mixing is switched off"]


@pytest.mark.parametrize("flags, lrs", [
    # by hand, from --lr 1e-3: per epoch, the rate each epoch trains at (halved after each epoch) ...
    (["--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5", "--sched-on-epochs"], [1e-3, 5e-4, 2.5e-4]),
    # ... per update, the rate after the epoch's last update: halved at the ends of epochs 1 and 2 only
    (["--sched", "multistep", "--decay-milestones", "1", "2", "--decay-rate", "0.5"], [5e-4, 2.5e-4, 2.5e-4]),
    # timm's none: --lr throughout, the warm-up left out
    (["--sched", "none", "--warmup-epochs", "3"], [1e-3, 1e-3, 1e-3]),
    # wsd with the last third (one epoch) as its decay phase: --lr through epoch 2, --min-lr after the last update
    (["--sched", "wsd", "--decay-epochs", "0.34", "--warmup-epochs", "0", "--min-lr", "1e-5"], [1e-3, 1e-3, 1e-5]),
], ids=["step", "multistep", "none", "wsd"])
def test_timm_schedule_flags_shape_the_rate(tmp_path, flags, lrs):
    """timm's --decay-epochs, --decay-milestones and --decay-rate reach its scheduler; without them a
    step schedule keeps --lr for its first 90 epochs, and --sched none crashed."""
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "r", *TINY, "--mix", "none", "--epochs", "3",
                     "--batch-size", "32", "--train-subset", "128", "--lr", "1e-3", *flags]) == 0
    assert [float(row["lr"]) for row in summary(tmp_path / "r")] == pytest.approx(lrs)


def test_timm_optimizer_and_clipping_flags_reach_the_update(tmp_path):
    """--opt-eps/--opt-betas reach the optimizer; --clip-mode picks what --clip-grad bounds. One plain SGD
    update (lr 1, no momentum or decay) moves the weights by minus the clipped gradient: by value, no
    element moves more than the bound; by norm, all of them together move exactly that far."""
    def step(name: str, *flags: str) -> dict:
        assert cli.main(["train", "--output", str(tmp_path), "--experiment", name, *TINY, "--mix", "none",
                         "--epochs", "1", "--batch-size", "32", "--train-subset", "32", *flags]) == 0
        return torch.load(tmp_path / name / "last.pth.tar", map_location="cpu", weights_only=True)

    adamw = step("adamw", "--opt-betas", "0.8", "0.95", "--opt-eps", "1e-6")["optimizer"]["param_groups"][0]
    assert (tuple(adamw["betas"]), adamw["eps"]) == ((0.8, 0.95), 1e-6)
    # Adafactor keeps its one beta as beta1, not in betas: taken, not refused as unused
    assert step("adafactor", "--opt", "adafactor", "--opt-betas", "0.9")["optimizer"]["param_groups"][0]["beta1"] == 0.9
    # timm's "momentum" is plain SGD (its "sgd" is Nesterov's, which needs a momentum)
    sgd = ["--opt", "momentum", "--lr", "1", "--momentum", "0", "--weight-decay", "0", "--sched", "none", "--clip-grad", "1e-6"]
    start = step("start", *sgd, "--lr", "1e-30")["state_dict"]  # the same initial weights, (all but) unmoved
    after = {mode: step(mode, *sgd, "--clip-mode", mode)["state_dict"] for mode in ("value", "norm")}
    moved = {mode: torch.cat([(weights[k] - w).flatten() for k, w in start.items() if w.is_floating_point()])
             for mode, weights in after.items()}
    # within fp32 rounding of weights near 0.5 (a step of 6e-8)
    assert moved["value"].abs().max().item() == pytest.approx(1e-6, rel=0.1)
    assert moved["value"].norm().item() > 10 * 1e-6
    assert moved["norm"].norm().item() == pytest.approx(1e-6, rel=0.1)


@pytest.mark.parametrize("unit", [[], ["--sched-on-epochs"]], ids=["per-update", "per-epoch"])
def test_resume_with_more_epochs_schedules_over_them(tmp_path, capsys, unit):
    """Raising --epochs on resume must train on with a schedule over the new total: the saved
    schedule ends at the old run's last update, so epochs past it would all run at --min-lr.
    A schedule stepped per epoch must set the new rate before the first resumed epoch, not after it."""
    def train(*extra: str) -> int:
        return cli.main(["train", "--output", str(tmp_path), *TINY, "--mix", "none", "--batch-size", "32",
                         "--train-subset", "128", "--min-lr", "1e-5", *unit, *extra])

    assert train("--experiment", "r", "--epochs", "1") == 0
    assert train("--resume", str(tmp_path / "r"), "--epochs", "3") == 0
    assert "the learning-rate schedule now spans 3 epochs x 4 steps (the checkpoint's: 1 x 4)" in capsys.readouterr().out
    lrs = [float(row["lr"]) for row in summary(tmp_path / "r")]
    assert len(lrs) == 3 and lrs[1] > 10 * 1e-5  # the new cosine is still high in the second epoch


def test_model_ema_first_given_at_a_resume_averages_from_the_resumed_weights(tmp_path, capsys):
    """timm builds the EMA after resuming; built before, it started from the random initial weights.
    The summary's EMA columns, absent from the earlier rows, are left empty there."""
    def train(*extra: str) -> int:
        return cli.main(["train", "--output", str(tmp_path), *TINY, "--mix", "none", "--batch-size", "32",
                         "--train-subset", "128", *extra])

    assert train("--experiment", "r", "--epochs", "1") == 0
    resumed = torch.load(tmp_path / "r" / "last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    # a decay this close to 1 keeps the EMA where it started over the next 4 updates
    assert train("--resume", str(tmp_path / "r"), "--epochs", "2", "--model-ema", "--model-ema-decay", "0.999999") == 0
    ckpt = torch.load(tmp_path / "r" / "last.pth.tar", map_location="cpu", weights_only=True)
    moved = max((ckpt["state_dict"][k] - v).abs().max().item() for k, v in resumed.items())
    drift = max((ckpt["state_dict_ema"][k] - v).abs().max().item() for k, v in resumed.items())
    assert moved > 1e-4 and drift < 0.01 * moved
    rows = summary(tmp_path / "r")
    assert [row["ema_eval_top1"] == "" for row in rows] == [True, False]
    # the console shows the EMA's figures as it shows the merged model's: on the epoch line and at the end
    out = capsys.readouterr().out
    assert f"ema top-1 {float(rows[1]['ema_eval_top1']):6.2f}  ECE {float(rows[1]['ema_eval_ece']):.4f}" in out
    assert "\nema    top-1 " in out and out.rstrip().endswith("(the weights' EMA)")


def test_plateau_resume_keeps_its_counters_and_takes_the_flags_settings():
    """The counters come from the checkpoint; patience, factor and min_lr stay what the flags say now."""
    from timm.scheduler import create_scheduler_v2

    def plateau(patience: int, rate: float):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return create_scheduler_v2(optimizer, sched="plateau", num_epochs=10, patience_epochs=patience,
                                   decay_rate=rate, warmup_epochs=0, min_lr=0.0)[0]

    saved = plateau(1, 0.5)
    for epoch, top1 in enumerate([50.0, 40.0]):  # one bad epoch after the best
        saved.step(epoch + 1, top1)
    resumed = plateau(5, 0.1)
    train_module.load_scheduler_state(resumed, train_module.scheduler_state(saved))
    inner = resumed.lr_scheduler
    assert (inner.best, inner.num_bad_epochs) == (50.0, 1) and (inner.patience, inner.factor) == (5, 0.1)


def test_model_ema_copies_the_weights_at_the_first_update_only(tmp_path, monkeypatch):
    """timm's EMA decay is 0 at step 1 (a copy) and the set decay after; train.py passes the update count."""
    decays = []
    update = train_module.ModelEmaV3.update

    def recording_update(self, model, step=None):
        decays.append(self.get_decay(step))
        return update(self, model, step=step)

    monkeypatch.setattr(train_module.ModelEmaV3, "update", recording_update)
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "e", *TINY, "--mix", "none", "--epochs", "1",
                     "--batch-size", "32", "--train-subset", "128", "--model-ema", "--model-ema-decay", "0.9"]) == 0
    assert decays == [0.0, 0.9, 0.9, 0.9]


def test_plateau_schedule_trains_and_resumes(tmp_path):
    """It steps per epoch on the evaluation top-1 (create_scheduler_v2 refuses it per update)."""
    def train(*extra: str) -> int:
        return cli.main(["train", "--output", str(tmp_path), *TINY, "--mix", "none", "--batch-size", "32",
                         "--train-subset", "128", "--sched", "plateau", *extra])

    assert train("--experiment", "p", "--epochs", "1") == 0
    assert train("--resume", str(tmp_path / "p"), "--epochs", "2") == 0
    assert len(summary(tmp_path / "p")) == 2


def test_plateau_resume_remembers_the_epochs_already_waited(tmp_path):
    """timm's plateau state_dict keeps the best metric only; ReduceLROnPlateau's count of bad epochs
    must survive a resume too (and a resume that raises --epochs: a plateau has no span)."""
    def train(*extra: str) -> int:
        # at this rate the top-1 stays put: every epoch after the first is a bad one
        return cli.main(["train", "--output", str(tmp_path), *TINY, "--mix", "none", "--batch-size", "32",
                         "--train-subset", "128", "--sched", "plateau", "--patience-epochs", "1", "--decay-rate",
                         "0.5", "--opt", "sgd", "--lr", "1e-6", "--min-lr", "0", *extra])

    assert train("--experiment", "straight", "--epochs", "4") == 0
    assert train("--experiment", "resumed", "--epochs", "2") == 0
    assert train("--resume", str(tmp_path / "resumed"), "--epochs", "4") == 0
    lrs = [float(row["lr"]) for row in summary(tmp_path / "straight")]
    assert lrs == [1e-6, 1e-6, 1e-6, 5e-7]  # two bad epochs (1 and 2) exceed a patience of 1
    assert [float(row["lr"]) for row in summary(tmp_path / "resumed")] == lrs


def test_resume_inside_an_epoch_of_another_size_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "r", *TINY, "--mix", "none",
                     *SHORT]) == 0
    ckpt = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)
    ckpt.update(epoch=0, step=3)  # as a run stopped at step 3 of epoch 1 writes it
    checkpoint.save(ckpt, run / "last.pth.tar")
    before = (run / "last.pth.tar").read_bytes()
    assert cli.main(["train", "--resume", str(run), "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "stopped inside an epoch of 8 steps, but this run has 4 steps per epoch" in err
    assert (run / "last.pth.tar").read_bytes() == before


def test_a_signal_repeated_at_once_is_one_request_to_stop(monkeypatch):
    """Under torchrun a worker gets SIGTERM/SIGINT from its process group and again from torchrun:
    that must still end in a checkpoint; a second signal seconds later stops at once."""

    now = [100.0]
    monkeypatch.setattr(train_module.time, "monotonic", lambda: now[0])
    stop = train_module.StopSignal()
    stop._handle(signal.SIGTERM, None)
    now[0] += 0.01
    stop._handle(signal.SIGINT, None)  # the forwarded duplicate
    assert stop.signum == signal.SIGTERM
    now[0] += train_module.StopSignal.DUPLICATE_S
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_eval_merged_scores_the_model_as_a_separate_merged_eval_of_its_checkpoint_does(tmp_path, capsys):
    """--eval-merged adds the model merged as it trained (here every 2nd block, bias off): per epoch
    and in results.json, what `mergemix eval` of the final checkpoint with that merging gives,
    beside plain figures equal to a run without the flag. A method that never merges is refused."""
    fast = [*TINY, "--aux-loss", "none", "--mix-opt", "prop_attn=false", "--merge-num", "6", "--merge-every", "2",
            "--epochs", "2", "--batch-size", "32", "--train-subset", "128"]
    for name, flag in (("merged", ["--eval-merged"]), ("plain", [])):
        assert cli.main(["train", "--output", str(tmp_path), "--experiment", name, *fast, *flag]) == 0
    log = capsys.readouterr().out
    assert "--eval-merged evaluates it both ways" in log and "merged top-1" in log
    rows = list(csv.DictReader((tmp_path / "merged" / "summary.csv").open()))
    assert [r["merged_eval_top1"] != "" for r in rows] == [True, True]
    # the extra pass draws nothing: training and the plain evaluation are those of a run without it
    assert [{k: v for k, v in r.items() if not k.startswith("merged_")} for r in summary(tmp_path / "merged")] == \
        summary(tmp_path / "plain")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "merged" / checkpoint.LAST), "--merge-num", "6",
                     "--merge-every", "2", "--no-prop-attn", "--output", str(tmp_path / "eval")]) == 0
    separate = json.loads((tmp_path / "eval" / "results.json").read_text())
    results = json.loads((tmp_path / "merged" / "results.json").read_text())
    for key, column in (("top1", "merged_eval_top1"), ("nll", "merged_eval_loss"), ("ece", "merged_eval_ece")):
        assert results["merged"][key] == pytest.approx(separate[key], abs=1e-5), key
        assert float(rows[-1][column]) == pytest.approx(separate[key], abs=1e-5), column
    assert results["merged"]["nll"] != pytest.approx(results["nll"], abs=1e-5)  # merged is another forward
    capsys.readouterr()
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "cut", *fast[:len(TINY)], "--mix", "cutmix",
                     "--eval-merged"]) == 2
    assert "but --mix cutmix with these options trains unmerged forwards" in capsys.readouterr().err
    assert not (tmp_path / "cut").exists()


def test_eval_interval_skips_evaluations_but_not_the_last_and_changes_no_training(reference, tmp_path):
    """--eval-interval 2 over 3 epochs evaluates after epochs 2 and 3 only: the same training, the same
    figures there as the run evaluated every epoch, and the best checkpoint among the evaluated."""
    assert subprocess.run(command(tmp_path, "sparse", *SHORT, "--eval-interval", "2"), capture_output=True).returncode == 0
    rows, full = summary(tmp_path / "sparse"), summary(reference)
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full]
    assert rows[0]["eval_top1"] == rows[0]["eval_ece"] == "" and rows[1:] == full[1:]
    results = json.loads((tmp_path / "sparse" / "results.json").read_text())
    assert results["top1"] == json.loads((reference / "results.json").read_text())["top1"]
    peak = max((1, 2), key=lambda e: float(rows[e]["eval_top1"]))
    assert results["best_epoch"] == peak == torch.load(tmp_path / "sparse" / checkpoint.BEST, weights_only=False)["epoch"]


def test_epoch_line_shows_what_the_row_holds():
    epoch_line = train_module.epoch_line
    skipped = {"epoch": 2, "train_loss": 1.23456, "lr": 5e-4, "epoch_time": 3.14}  # --eval-interval skipped it
    assert epoch_line(skipped, 10) == "epoch   3/10  train_loss 1.2346  lr 5.00e-04  3.1s"
    evaluated = skipped | {"eval_loss": 0.5, "eval_top1": 81.25, "eval_top5": 99.0, "eval_ece": 0.0312,
                           "merged_eval_loss": 0.6, "merged_eval_top1": 80.5, "merged_eval_ece": 0.04}
    assert epoch_line(evaluated, 10) == ("epoch   3/10  train_loss 1.2346  eval_loss 0.5000  top-1  81.25  "
                                         "top-5  99.00  ECE 0.0312  merged top-1  80.50  ECE 0.0400  "
                                         "lr 5.00e-04  3.1s")


@pytest.mark.parametrize("method", ["none", "mergemix"])
def test_one_sgd_update_lowers_the_loss_of_its_images(tmp_path, method):
    """The step goes down the objective's gradient: one plain SGD update on 32 digits lowers the
    cross-entropy of those digits (seen unaugmented), where a sign error in the update would raise it."""
    from mergemix import data
    from mergemix.config import parse_train_args

    sgd = [*TINY, "--mix", method, "--epochs", "1", "--batch-size", "32", "--train-subset", "32", "--opt", "momentum",
           "--momentum", "0", "--weight-decay", "0", "--sched", "none"]
    weights = {}
    for name, lr in (("start", "1e-30"), ("after", "0.1")):  # the same initial weights, (all but) unmoved
        assert cli.main(["train", "--output", str(tmp_path), "--experiment", name, *sgd, "--lr", lr]) == 0
        weights[name] = torch.load(tmp_path / name / "last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]

    subset = data.build(parse_train_args(sgd)).train
    images = subset.dataset.images[subset.indices]
    x, y = (images - subset.dataset.mean) / subset.dataset.std, subset.dataset.labels[subset.indices]
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=x.shape[-1], in_chans=1, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2).eval()
    losses = {}
    for name, state in weights.items():
        model.load_state_dict(state)
        with torch.no_grad():
            losses[name] = F.cross_entropy(model(x), y).item()
    assert losses["after"] < losses["start"] - 0.01, losses


def test_a_tie_keeps_the_first_epoch_of_the_top_score_as_the_best(tmp_path):
    """Best means strictly better: at a learning rate of 1e-12 the weights stay as they were, every epoch
    scores the same top-1, and the first of them stays best (model_best.pth.tar and results.json), as
    timm's CheckpointSaver keeps its first checkpoint of a metric until another beats it."""
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "tie", *TINY, "--mix", "none", "--epochs",
                     "2", "--batch-size", "32", "--train-subset", "64", "--lr", "1e-12", "--min-lr", "1e-12"]) == 0
    run = tmp_path / "tie"
    assert len({r["eval_top1"] for r in summary(run)}) == 1  # the premise: equal scores
    best = torch.load(run / checkpoint.BEST, map_location="cpu", weights_only=True)
    assert best["epoch"] == json.loads((run / "results.json").read_text())["best_epoch"] == 0


class ZeroAfterFirst(NoMix):
    """Plain CE at the first call, the loss times 0 (a graph whose gradient is 0) from the second on; keeps
    the weights each call is handed."""

    name = "zero_after_first_test"
    calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, x, y):
        ZeroAfterFirst.calls.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        out = super().__call__(model, x, y)
        if len(ZeroAfterFirst.calls) > 1:
            out.loss = out.loss * 0.0
        return out


def test_each_update_applies_its_own_gradient_only(tmp_path, monkeypatch):
    """Gradients are cleared before each backward: one plain SGD update whose loss has a zero gradient leaves
    the weights where the update before it left them; kept, the first update's gradient would move them again."""
    monkeypatch.setitem(mix._REGISTRY, ZeroAfterFirst.name, ZeroAfterFirst)
    monkeypatch.setattr(ZeroAfterFirst, "calls", [])
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "z", *TINY, "--mix", ZeroAfterFirst.name,
                     "--epochs", "1", "--batch-size", "32", "--train-subset", "64", "--opt", "momentum", "--momentum",
                     "0", "--weight-decay", "0", "--sched", "none", "--lr", "0.1"]) == 0
    start, after_first = ZeroAfterFirst.calls  # 2 steps
    final = torch.load(tmp_path / "z" / "last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    assert max((after_first[k] - w).abs().max().item() for k, w in start.items()) > 1e-4  # the first step moved them
    assert all(torch.equal(final[k], w) for k, w in after_first.items())


class RecordLabels(NoMix):
    """Plain CE that records the labels of every batch it trains on."""

    name = "record_labels_test"
    seen: list[list[int]] = []

    def __call__(self, model, x, y):
        RecordLabels.seen.append(y.tolist())
        return super().__call__(model, x, y)


def test_each_epoch_shuffles_its_images_anew(tmp_path, monkeypatch):
    """The sampler's order follows the epoch (DistributedSampler's set_epoch): two epochs over the same 64
    digits see them in different orders; without it every epoch replays the first one's batches."""
    monkeypatch.setitem(mix._REGISTRY, RecordLabels.name, RecordLabels)
    monkeypatch.setattr(RecordLabels, "seen", [])
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "s", *TINY, "--mix", RecordLabels.name,
                     "--epochs", "2", "--batch-size", "32", "--train-subset", "64"]) == 0
    seen = RecordLabels.seen
    assert len(seen) == 4  # 2 epochs x 2 steps
    first, second = seen[0] + seen[1], seen[2] + seen[3]
    assert sorted(first) == sorted(second)  # the same images ...
    assert first != second  # ... in another order


def test_the_epoch_loss_is_the_mean_over_steps_whatever_the_log_interval(tmp_path):
    """--log-interval sets how often losses are checked, not what the epoch's mean counts: 4 steps checked
    after each one or in groups of 3 and 1 give the same train_loss."""
    rows = {}
    for interval in ("1", "3"):
        assert cli.main(["train", "--output", str(tmp_path), "--experiment", interval, *TINY, "--mix", "none",
                         "--epochs", "1", "--batch-size", "16", "--train-subset", "64", "--log-interval", interval]) == 0
        rows[interval] = summary(tmp_path / interval)
    assert float(rows["3"][0].pop("train_loss")) == pytest.approx(float(rows["1"][0].pop("train_loss")), rel=1e-6)
    assert rows["3"] == rows["1"]


def test_fp16_clipping_bounds_the_unscaled_gradient(tmp_path):
    """Under fp16 the gradients are the loss scaler's (x 65536 at first) until unscaled: clipping by norm must
    come after unscaling, so one plain SGD update (lr 1) moves the weights by exactly the bound, not by
    the bound over the scale."""
    def step(name: str, *flags: str) -> dict:
        assert cli.main(["train", "--output", str(tmp_path), "--experiment", name, *TINY, "--mix", "none", "--amp",
                         "--amp-dtype", "float16", "--epochs", "1", "--batch-size", "32", "--train-subset", "32",
                         "--opt", "momentum", "--momentum", "0", "--weight-decay", "0", "--sched", "none",
                         "--clip-grad", "1e-3", "--clip-mode", "norm", *flags]) == 0
        ckpt = torch.load(tmp_path / name / "last.pth.tar", map_location="cpu", weights_only=True)
        assert ckpt["amp_scaler"]["scale"] > 1  # the scaler is active here (on CPU too)
        return ckpt["state_dict"]

    start, after = step("start", "--lr", "1e-30"), step("after", "--lr", "1")
    moved = torch.cat([(after[k] - w).flatten() for k, w in start.items() if w.is_floating_point()])
    assert moved.norm().item() == pytest.approx(1e-3, rel=0.01)


def test_a_model_that_sees_a_patch_or_two_gets_a_note(tmp_path, capsys):
    """vit_tiny_patch16_224 named by hand on 16-px digits sees one patch (the default run's kwargs set patch 4)."""
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "one", "--model", "vit_tiny_patch16_224",
                     "--model-kwargs", "depth=1", "--epochs", "1", "--batch-size", "32", "--train-subset", "64"]) == 0
    out = capsys.readouterr().out
    assert "1 patches of 16x16" in out and "cuts the 16x16 images into 1 patch(es)" in out
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "sixteen", *TINY, "--epochs", "1",
                     "--batch-size", "32", "--train-subset", "64"]) == 0
    assert "patch(es)" not in capsys.readouterr().out
