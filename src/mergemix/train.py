"""The training loop: one ``objective(model, x, y)`` call per step, whatever the mixing method.

Order of work: data -> model -> objective (``prepare`` patches the model) -> optimizer, schedule,
EMA -> resume -> compile / DDP -> run folder -> epochs. Every check that can fail on bad input
runs before the run folder is created, so a rejected run leaves nothing behind.

Per epoch: train (loss checked every ``--log-interval`` steps: a non-finite loss stops the run
and names the step; SIGINT/SIGTERM stop after the current step with a resumable checkpoint),
evaluate (``EvalMetrics``, synced over processes; every ``--eval-interval`` epochs and the last),
then on rank 0 append to summary.csv and
write last.pth.tar (and model_best.pth.tar when top-1 improves), each atomically.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, config, data, distributed, mix, models
from .errors import CheckpointError, ConfigError, Interrupted, TrainingError
from .evaluate import RESULT_KEYS, autocast, autocast_dtype, check_classes, evaluate, summary_line, write_results
from .mix.base import Objective

# what a run writes in its folder with or after its first checkpoint (last.pth.tar), which a new run must not
# replace; args.yaml, mix_samples/ and a model_best.pth.tar carried over by --resume come earlier: a run killed
# before that checkpoint may start again over them
RUN_FILES = ("summary.csv", "results.json", "reliability.png", "curves.png")
SUMMARY_FIELDS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "eval_ece", "lr", "epoch_time"]


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (or next to run)
    step: int = 0  # updates done in that epoch
    global_step: int = 0
    loss_sum: float = 0.0  # this process's loss sum and count in the epoch so far
    loss_count: int = 0
    epoch_time: float = 0.0  # seconds spent in the epoch so far (before a stop)
    best_top1: float = float("-inf")
    best_epoch: int = -1
    rows: list[dict[str, float]] = field(default_factory=list)


class StopSignal:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks; a second one stops at once.

    A second signal within ``DUPLICATE_S`` of the first is the same request, not an insistence:
    under torchrun a worker gets the signal from its process group (Ctrl-C, ``docker stop``,
    ``timeout``) and again as torchrun forwards it, milliseconds apart.
    """

    DUPLICATE_S = 2.0

    def __init__(self) -> None:
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.DUPLICATE_S:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def schedule_notes(args: argparse.Namespace) -> list[str]:
    """Schedule settings that run but are likely mistakes (a learning-rate floor above the peak, a warm-up
    as long as the run, mixing switched off after the run ends): worth a line, not an error, since a
    user may mean them."""
    notes = []
    if args.min_lr > args.lr:
        notes.append(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the schedule ends higher than its peak")
    if args.sched == "none" and args.warmup_epochs:
        notes.append(f"--sched none trains at --lr throughout, as timm's does: --warmup-epochs {args.warmup_epochs} "
                     f"is not applied (--sched constant warms up, then holds --lr)")
    elif args.warmup_epochs >= args.epochs:
        notes.append(f"--warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the run ends inside its warm-up")
    if args.mixup_off_epoch >= args.epochs:
        notes.append(f"--mixup-off-epoch {args.mixup_off_epoch} >= --epochs {args.epochs}: the run ends before "
                     f"mixing is switched off")
    return notes


def build_objective(args: argparse.Namespace, num_classes: int,
                    generator: torch.Generator) -> tuple[Objective, dict[str, Any]]:
    """The method's objective with the options its ``__init__`` takes; returns (objective, ignored options)."""
    try:
        cls = mix.get_class(args.mix)
    except ValueError as e:
        raise ConfigError(f"--mix: {e}") from None
    try:
        mix.check_option_names(cls, args.mix_opt)  # flags set only options a method takes; --mix-opt any
    except TypeError as e:
        raise ConfigError(f"--mix {e}") from None  # "--mix mergemix has no option ..."
    options, unused = config.method_options(args, set(mix.accepted_options(cls)))
    try:
        return mix.create(args.mix, num_classes, generator=generator, **options), unused
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--mix {args.mix}: {e}") from None


# ReduceLROnPlateau's counters; its settings (patience, factor, min_lr) stay the flags' at a resume
PLATEAU_COUNTERS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch", "_last_lr")


def scheduler_state(scheduler: Scheduler) -> dict[str, Any]:
    """timm's scheduler state, with ReduceLROnPlateau's counters under "plateau": timm's plateau keeps only
    its best metric, and a resume would forget the epochs already waited (and any cooldown)."""
    inner = scheduler.lr_scheduler if isinstance(scheduler, PlateauLRScheduler) else None
    counters = {k: getattr(inner, k) for k in PLATEAU_COUNTERS if hasattr(inner, k)} if inner is not None else None
    return scheduler.state_dict() | ({"plateau": counters} if counters is not None else {})


def load_scheduler_state(scheduler: Scheduler, state: dict[str, Any]) -> None:
    """Restore what ``scheduler_state`` saved (or a timm state_dict)."""
    state = dict(state)
    plateau = state.pop("plateau", None)
    scheduler.load_state_dict(state)
    if plateau is not None and isinstance(scheduler, PlateauLRScheduler):
        for key in PLATEAU_COUNTERS:
            if key in plateau:
                setattr(scheduler.lr_scheduler, key, plateau[key])


def _holds_epoch(path: Path, epoch: int) -> bool:
    """Whether ``path`` is a readable checkpoint written at the end of ``epoch``."""
    try:
        return path.is_file() and checkpoint.load(path).get("epoch") == epoch
    except CheckpointError:
        return False


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (which takes 32 bits) and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_process(seed: int, rank: int) -> torch.Generator:
    """Seed this process's global RNGs with ``distributed.process_seed(seed, rank)``; return the objective's
    generator, seeded the same.

    Every process draws its own partners, λ and masks; rank 0 of a run with seed s draws what a
    one-process run with seed s draws.
    """
    seed = distributed.process_seed(seed, rank)
    seed_everything(seed)
    return torch.Generator().manual_seed(seed)


def prepare_model(objective: Objective, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``objective.prepare(model)`` (patches ViTs for attention read-out) with one-line errors for what does not fit."""
    try:
        return objective.prepare(model)
    except ValueError as e:
        raise ConfigError(f"--mix {args.mix} does not fit {args.model}: {e}") from None


def _rows_csv(rows: list[dict[str, float]]) -> str:
    # every row's columns: a run resumed with --model-ema adds EMA columns its earlier rows lack (left empty)
    fields = SUMMARY_FIELDS + list(dict.fromkeys(k for row in rows for k in row if k not in SUMMARY_FIELDS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def trained(epochs: int, steps: int = 0) -> str:
    """'3 epochs', '1 epoch and 4 steps': how far a checkpoint got."""
    return f"{epochs} epoch{'s' * (epochs != 1)}" + (f" and {steps} step{'s' * (steps != 1)}" if steps else "")


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The console's line for one summary.csv row; evaluation figures only where the row has them."""
    line = f"epoch {row['epoch'] + 1:>3}/{epochs}  train_loss {row['train_loss']:.4f}  "
    if "eval_top1" in row:
        line += (f"eval_loss {row['eval_loss']:.4f}  top-1 {row['eval_top1']:6.2f}  top-5 {row['eval_top5']:6.2f}  "
                 f"ECE {row['eval_ece']:.4f}  ")
    line += "".join(f"{name} top-1 {row[f'{name}_eval_top1']:6.2f}  ECE {row[f'{name}_eval_ece']:.4f}  "
                    for name in ("merged", "ema") if f"{name}_eval_top1" in row)
    return line + f"lr {row['lr']:.2e}  {row['epoch_time']:.1f}s"


class Trainer:
    """Holds the run's objects; ``fit()`` runs the epochs. Build with ``Trainer(args, ctx)``."""

    def __init__(self, args: argparse.Namespace, ctx: distributed.Context):
        self.args, self.ctx = args, ctx
        self.log = functools.partial(print, flush=True) if ctx.is_main else (lambda *a, **k: None)
        self.generator = seed_process(args.seed, ctx.rank)
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        else:  # cuDNN times its kernels per shape; untimed, it ran DeiT-S's patch embedding as a slow implicit sgemm
            torch.backends.cudnn.benchmark = True

        self.run_dir = Path(args.output) / args.experiment  # claimed last: what fails before leaves no folder
        resumed = checkpoint.load(args.resume) if args.resume else None  # read first: its data must be this run's
        if resumed is not None:
            self._check_latest(resumed)
        self.data = self._build_data(resumed)
        args.num_classes, args.img_size = self.data.num_classes, self.data.img_size
        self.model = models.create(args.model, num_classes=args.num_classes, img_size=args.img_size,
                                   in_chans=self.data.in_chans, drop_rate=args.drop, drop_path_rate=args.drop_path,
                                   # a resume replaces the starting weights: neither the hub nor a file that
                                   # may be gone since is needed again
                                   model_kwargs=args.model_kwargs, pretrained=args.pretrained and resumed is None,
                                   initial_checkpoint=args.initial_checkpoint if resumed is None else None)

        self.objective, self.unused_options = build_objective(args, args.num_classes, self.generator)
        if args.batch_size < 2 and self.objective.pairs_images:
            unpaired = " or ".join(n for n in mix.available() if not mix.get_class(n).pairs_images)
            raise ConfigError(f"--batch-size {args.batch_size}: --mix {args.mix} pairs every image with another "
                              f"of its batch, so it needs at least 2 per process; raise --batch-size or use --mix {unpaired}")
        self.model = prepare_model(self.objective, self.model, args).to(ctx.device)
        if args.eval_merged and self.objective.trained_forward(self.model) is None:
            raise ConfigError(f"--eval-merged evaluates the model merged as it trained, but --mix {args.mix} "
                              f"with these options trains unmerged forwards (`mergemix methods` lists each method's options)")

        workers = data.loader_workers(self.data, args.workers)
        self.train_loader = data.train_loader(self.data, args.batch_size, workers, ctx.rank, ctx.world_size,
                                              args.seed, ctx.device)
        self.steps_per_epoch = len(self.train_loader)
        eval_batch = args.eval_batch_size if args.eval_batch_size is not None else 2 * args.batch_size
        self.eval_loader = data.eval_loader(self.data, eval_batch, workers, ctx.rank, ctx.world_size, ctx.device)
        self._build_optimization()

        self.progress = Progress()
        self.made_dir: Path | None = None  # the outermost folder this run created (its run folder or a parent)
        if resumed is not None:
            self._restore(resumed)
        compiled = torch.compile(self.model, mode=args.compile_mode) if args.compile else self.model
        self.eval_model = compiled
        self.train_model = compiled
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(compiled, device_ids=ids)
        # last: whatever fails above leaves no folder behind; from here on train() removes it
        self._claim_run_dir()
        if args.resume:  # said once the run folder accepted it
            p = self.progress
            self.log(f"resumed {args.resume}: epoch {p.epoch}" + (f", step {p.step}" if p.step else ""))

    def _build_data(self, resumed: dict[str, Any] | None) -> data.DataBundle:
        """The data set; under torchrun with --download, rank 0 fetches while the others wait.

        A resume goes on with the data its run trained on: its summary rows and best epoch belong to it, and
        other classes would shift the labels. The data set's name is checked before it is built."""
        args, ctx = self.args, self.ctx
        saved = (resumed or {}).get("args") or {}
        other = f"to fine-tune on other data, start a new run with --initial-checkpoint {args.resume}"
        if saved.get("dataset", args.dataset) != args.dataset:
            raise ConfigError(f"--resume {args.resume} trained on {saved['dataset']}, not --dataset {args.dataset}: "
                              f"a resume goes on with its run's data; {other}")
        download_first = ctx.distributed and args.download
        if download_first and not ctx.is_main:
            distributed.barrier(ctx)
        bundle = data.build(args)
        if download_first and ctx.is_main:
            distributed.barrier(ctx)
        if resumed is not None:
            check_classes(resumed, bundle, f"--resume {args.resume}",
                          fix=f"name the class folders as in training; {other}")
            if (saved.get("num_classes") or bundle.num_classes) != bundle.num_classes:
                raise ConfigError(f"--resume {args.resume} trained on {saved['num_classes']} classes, but this "
                                  f"{args.dataset} has {bundle.num_classes}: {other}")
        if args.num_classes is not None and args.num_classes != bundle.num_classes:
            raise ConfigError(f"--num-classes {args.num_classes} but {args.dataset} has {bundle.num_classes} classes")
        return bundle

    def _build_optimization(self) -> None:
        """timm's optimizer and per-update schedule, the fp16 loss scaler and the weights' EMA."""
        args = self.args
        # timm's --opt-eps / --opt-betas: passed only when given, so each optimizer keeps its own defaults
        given = {k: v for k, v in (("eps", args.opt_eps), ("betas", args.opt_betas)) if v is not None}
        # --sched none: timm leaves the rate at --lr, no warm-up; its 'constant' schedule without warm-up is that
        sched, warmup = ("constant", 0) if args.sched == "none" else (args.sched, args.warmup_epochs)
        try:
            self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                                 momentum=args.momentum, **given)
        except IndexError:  # the optimizer reads a beta past the end of the list
            if not args.opt_betas:
                raise
            raise ConfigError(f"--opt {args.opt} takes more --opt-betas than {' '.join(map(str, args.opt_betas))} "
                              f"(Adam and its kin: two)") from None
        except (TypeError, ValueError) as e:  # an unknown name, or a setting the optimizer refuses
            raise ConfigError(f"--opt {args.opt}: {e}") from None
        # timm drops betas an optimizer has no use for (SGD: all; AdamW: a third) without a word
        defaults = self.optimizer.defaults  # Adafactor keeps its one beta as beta1, not in betas
        kept = defaults.get("betas") or tuple(b for b in map(defaults.get, ("beta1", "beta2", "beta3")) if b is not None)
        if args.opt_betas and len(kept) < len(args.opt_betas):
            takes = f"takes {len(kept)} --opt-betas" if kept else "takes no --opt-betas"
            raise ConfigError(f"--opt {args.opt} ({type(self.optimizer).__name__}) {takes}, got "
                              f"{' '.join(map(str, args.opt_betas))}")
        try:
            self.scheduler, _ = create_scheduler_v2(
                self.optimizer, sched=sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
                decay_milestones=args.decay_milestones, decay_rate=args.decay_rate,
                patience_epochs=args.patience_epochs, warmup_epochs=warmup, warmup_lr=args.warmup_lr,
                min_lr=args.min_lr, step_on_epochs=args.sched_on_epochs, updates_per_epoch=self.steps_per_epoch)
        except ValueError as e:
            # timm counts wsd/rsqrt's decay phase in updates; say it in the flag's terms
            hint = (f" (--decay-epochs {args.decay_epochs:g}: the decay phase, at most the epochs after warm-up, "
                    f"or below 1 a fraction of them, e.g. 0.2)") if sched in ("wsd", "rsqrt") else ""
            raise ConfigError(f"--sched {args.sched}: {e}{hint}") from None
        self.amp_dtype = autocast_dtype(args)
        fp16 = self.amp_dtype is torch.float16
        self.scaler = torch.amp.GradScaler(self.ctx.device.type) if fp16 else None
        self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay) if args.model_ema else None

    def _claim_run_dir(self) -> None:
        """Rank 0 opens the run folder; its refusal is every rank's error."""
        distributed.on_main(self._open_run_dir, self.ctx, f"open {self.run_dir}")

    # -- run folder and checkpoints ------------------------------------------------------------

    def _open_run_dir(self) -> None:
        args = self.args
        checkpoint.check_names(self.run_dir, "--output/--experiment")  # before exists() raises on such a name
        continuing = self._continuing()
        if not continuing and (self.run_dir / checkpoint.LAST).exists():
            # only a run's own checkpoint may continue in its folder: anything else would overwrite it
            raise ConfigError(f"{self.run_dir} already holds a run: continue it with --resume {self.run_dir}, "
                              f"or pick another --experiment")
        taken = [name for name in RUN_FILES if (self.run_dir / name).exists()] if not continuing else []
        if taken:
            raise ConfigError(f"{self.run_dir} already holds {', '.join(taken)}, which this run would replace: "
                              f"pick another --experiment or --output")
        self.made_dir = checkpoint.make_dir(self.run_dir, "--output")
        if args.resume:
            checkpoint.clear_temporaries(self.run_dir)  # a kill mid-write leaves one behind
        if not continuing:  # a new folder gets its args.yaml now; a run's own folder with its next checkpoint (_save)
            self._write_args()
        if args.resume:
            self._carry_best(Path(args.resume))

    def _continuing(self) -> bool:
        """Whether --resume goes on in the checkpoint's own run folder."""
        return bool(self.args.resume) and Path(self.args.resume).resolve().parent == self.run_dir.resolve()

    def _check_latest(self, resumed: dict[str, Any]) -> None:
        """A run goes on in its own folder from its latest checkpoint: from an older one (a model_best.pth.tar
        behind last.pth.tar) it would overwrite the epochs after it. An unreadable last.pth.tar is no bar."""
        run_dir, last = self.run_dir, self.run_dir / checkpoint.LAST
        if not self._continuing() or Path(self.args.resume).resolve() == last.resolve() or not last.is_file():
            return
        try:
            latest = checkpoint.load(last)
        except CheckpointError:  # what is left to go on from is the older checkpoint
            return
        done, now = (latest.get("epoch", -1) + 1, latest.get("step", 0)), (resumed["epoch"] + 1, resumed.get("step", 0))
        if done > now:
            raise ConfigError(f"{last} has trained {trained(*done)}, {self.args.resume} only {trained(*now)}: going "
                              f"on from it in {run_dir} would overwrite the later epochs; resume the latest with "
                              f"--resume {run_dir}, or branch off into a new folder with --experiment NEW")

    def _write_args(self) -> None:
        checkpoint.write_text(self.run_dir / "args.yaml", yaml.safe_dump(config.recipe(self.args), sort_keys=False))

    def _carry_best(self, resumed: Path) -> None:
        """The run's folder holds the checkpoint of the epoch its results call best: a run resumed into a new
        folder brings it along, even if no later epoch beats it; one resumed in its own folder gets it back
        when a stop came between writing last.pth.tar and model_best.pth.tar (see ``_save``)."""
        p, best = self.progress, self.run_dir / checkpoint.BEST
        if p.best_epoch < 0 or _holds_epoch(best, p.best_epoch):
            return
        # the resumed checkpoint holds the best weights if it was written at the end of the best epoch
        source = resumed if p.step == 0 and p.best_epoch == p.epoch - 1 else resumed.parent / checkpoint.BEST
        if source.resolve() != best.resolve() and (source == resumed or _holds_epoch(source, p.best_epoch)):
            with checkpoint.atomic_path(best) as tmp:
                shutil.copyfile(source, tmp)
        else:
            self.log(f"note   the best epoch so far ({p.best_epoch}) has no checkpoint next to {resumed}; "
                     f"{best} will hold the first later epoch that beats it")

    def _state(self, completed_epoch: int, metric: float | None) -> dict[str, Any] | None:
        """The checkpoint dict (on rank 0; None elsewhere). Collective: every process must call it."""
        p = self.progress
        partial = {"loss_sum": p.loss_sum, "loss_count": p.loss_count, "epoch_time": p.epoch_time}
        per_rank = distributed.gather((checkpoint.rng_state(self.generator), partial), self.ctx)
        if not self.ctx.is_main:
            return None
        return {
            "epoch": completed_epoch,
            "arch": self.args.model,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
            "amp_scaler": self.scaler.state_dict() if self.scaler else None,
            "state_dict_ema": self.ema.module.state_dict() if self.ema else None,
            "version": 2,
            "args": dict(vars(self.args)),
            "metric": metric,
            "step": p.step,
            "global_step": p.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "classes": list(self.data.classes) if self.data.classes else None,
            "partial": [r[1] for r in per_rank],
            "best": {"top1": p.best_top1, "epoch": p.best_epoch},
            "rows": p.rows,
            "rng": [r[0] for r in per_rank],
        }

    def _restore_schedule(self, ckpt: dict[str, Any]) -> None:
        """The saved learning-rate schedule, or a new one when this run's epochs or steps per epoch
        differ (more --epochs to train on; another --batch-size or process count): the schedule
        counts updates, so the saved one would end at the old run's last update."""
        args, p = self.args, self.progress
        saved_steps = ckpt.get("steps_per_epoch", self.steps_per_epoch)
        saved_epochs = (ckpt.get("args") or {}).get("epochs", args.epochs)
        if saved_steps != self.steps_per_epoch:
            if p.step:  # the position inside the epoch counts batches of the old size
                raise ConfigError(f"{args.resume} stopped inside an epoch of {saved_steps} steps, but this run has "
                                  f"{self.steps_per_epoch} steps per epoch (another --batch-size, process count or "
                                  f"data): resume with the run's settings, or from a checkpoint at an epoch's end")
            p.global_step = p.epoch * self.steps_per_epoch
        same_span = saved_steps == self.steps_per_epoch and saved_epochs == args.epochs
        plateau = isinstance(self.scheduler, PlateauLRScheduler)  # its state holds no span
        if ckpt.get("scheduler") and (same_span or plateau):
            load_scheduler_state(self.scheduler, ckpt["scheduler"])
        if not (same_span or plateau):
            self.log(f"note   the learning-rate schedule now spans {args.epochs} epochs x {self.steps_per_epoch} "
                     f"steps (the checkpoint's: {saved_epochs} x {saved_steps})")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        args, p = self.args, self.progress
        checkpoint.load_weights(self.model, ckpt["state_dict"], f"--resume {args.resume}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt.get("amp_scaler"):
            self.scaler.load_state_dict(ckpt["amp_scaler"])
        if self.ema and ckpt.get("state_dict_ema"):
            self.ema.module.load_state_dict(ckpt["state_dict_ema"])
        elif self.ema:  # --model-ema new at this resume: average from the resumed weights, not the initial ones
            self.ema.set(self.model)
        p.epoch, p.step = ckpt["epoch"] + 1, ckpt.get("step", 0)
        p.global_step = ckpt.get("global_step", p.epoch * self.steps_per_epoch + p.step)
        self._restore_schedule(ckpt)
        best = ckpt.get("best") or {}
        p.best_top1, p.best_epoch = best.get("top1", float("-inf")), best.get("epoch", -1)
        p.rows = [r for r in ckpt.get("rows", []) if r["epoch"] < p.epoch]
        if p.epoch >= args.epochs:
            raise ConfigError(f"{args.resume} has already trained {trained(p.epoch, p.step)}: to train on, "
                              f"set --epochs above {p.epoch} (now {args.epochs})")
        rng, partial = ckpt.get("rng") or [], ckpt.get("partial") or []
        if len(rng) == len(partial) == self.ctx.world_size:
            checkpoint.set_rng_state(rng[self.ctx.rank], self.generator)
            mine = partial[self.ctx.rank]
            p.loss_sum, p.loss_count, p.epoch_time = mine["loss_sum"], mine["loss_count"], mine["epoch_time"]
        else:
            self.log(f"note   the checkpoint was written by {len(rng)} process(es), this run has "
                     f"{self.ctx.world_size}; random streams restart from the seed")
            # the epoch's loss so far goes on in rank 0's sums (the epoch's row adds every rank's)
            if self.ctx.is_main:
                p.loss_sum = sum(r["loss_sum"] for r in partial)
                p.loss_count = sum(r["loss_count"] for r in partial)
            p.epoch_time = max((r["epoch_time"] for r in partial), default=0.0)
            seed = distributed.process_seed(args.seed, self.ctx.rank, p.global_step)  # not epoch 0's draws again
            seed_everything(seed)
            self.generator.manual_seed(seed)
        # the optimizer holds the checkpoint schedule's last rate; set this schedule's (the call in
        # the schedule's own unit acts, the other does nothing)
        self.scheduler.step(p.epoch)
        self.scheduler.step_update(p.global_step)

    def _save(self, completed_epoch: int, metric: float | None, best: bool) -> None:
        state = self._state(completed_epoch, metric)
        if state is None:
            return
        # with its checkpoint: a resume that fails before saving leaves the run's recipe as it was
        self._write_args()
        checkpoint.write_text(self.run_dir / "summary.csv", _rows_csv(self.progress.rows))
        checkpoint.save(state, self.run_dir / checkpoint.LAST)
        if best:  # a kill before this write: the resume copies last.pth.tar here (_carry_best)
            checkpoint.save(state, self.run_dir / checkpoint.BEST)

    # -- the loop ------------------------------------------------------------------------------

    def _check(self, losses: list[torch.Tensor], stop: StopSignal) -> bool:
        """Fold the losses since the last check into the epoch mean; True if a stop was asked for."""
        p = self.progress
        values = torch.stack(losses).float().cpu()
        finite = torch.isfinite(values)
        nonfinite, stopping = distributed.any_true([not bool(finite.all()), stop.signum != 0], self.ctx)
        if nonfinite:
            first = p.step - len(values)  # 0-based index of the first step in ``values``
            where = (f"at epoch {p.epoch} step {first + int((~finite).nonzero()[0])}" if not finite.all()
                     else f"on another process between epoch {p.epoch} steps {first} and {p.step - 1}")
            kept = f"{self.run_dir / checkpoint.LAST} keeps epoch {p.epoch - 1}" if p.epoch else "no checkpoint was written"
            raise TrainingError(f"non-finite loss {where}; stopped, {kept}. Try a lower --lr, "
                                f"--clip-grad, or --amp-dtype bfloat16")
        p.loss_sum += float(values.sum())
        p.loss_count += len(values)
        return stopping

    def train_epoch(self, stop: StopSignal) -> bool:
        """One epoch (or its remainder after a resume); True if a signal asked to stop (every process agrees).

        A stop leaves the epoch early, unless it came at the epoch's last step.
        """
        args, p, ctx = self.args, self.progress, self.ctx
        sampler = self.train_loader.sampler
        sampler.set_epoch(p.epoch)
        sampler.skip = p.step * args.batch_size
        # modulo 2⁶⁴, the seeds torch takes: a large --seed would overflow
        self.train_loader.generator.manual_seed((distributed.process_seed(args.seed, ctx.rank) * 100_003 + p.epoch) % 2**64)
        self.objective.mixup_enabled = not (args.mixup_off_epoch and p.epoch >= args.mixup_off_epoch)
        self.train_model.train()
        total = p.step + len(self.train_loader)
        bar = tqdm(total=total, initial=p.step, desc=f"epoch {p.epoch}", leave=False,
                   disable=None if ctx.is_main else True)
        losses: list[torch.Tensor] = []
        stopping = False
        start = time.perf_counter() - p.epoch_time
        for x, y in self.train_loader:
            x = x.to(ctx.device, non_blocking=True)
            y = y.to(ctx.device, non_blocking=True)
            if args.compile:  # CUDA-graph trees (reduce-overhead) start a new generation here
                torch.compiler.cudagraph_mark_step_begin()
            try:
                with autocast(ctx.device, self.amp_dtype):
                    out = self.objective(self.train_model, x, y)
            except ValueError as e:
                raise ConfigError(f"--mix {args.mix} failed at epoch {p.epoch} step {p.step}: {e}",
                                  every_process_alike=False) from None  # this process's batch
            if args.save_mix_samples and p.step == 0 and p.epoch % args.save_mix_samples == 0 and ctx.is_main:
                from .viz import draw_step

                draw_step(x, out, self.model, self.run_dir / "mix_samples" / f"epoch{p.epoch:03d}.png",
                          self.data.mean, self.data.std, title=f"--mix {args.mix}, epoch {p.epoch}, first step")
            self._update(out.loss)
            p.step += 1
            p.global_step += 1
            self.scheduler.step_update(num_updates=p.global_step)
            losses.append(out.loss.detach())
            bar.update(1)
            if p.step % args.log_interval == 0 or p.step == total:
                stopping = self._check(losses, stop)
                losses = []
                bar.set_postfix(loss=f"{p.loss_sum / max(p.loss_count, 1):.4f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                if stopping:
                    break
        bar.close()
        p.epoch_time = time.perf_counter() - start
        return stopping

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, clip, step (through the grad scaler under fp16), EMA."""
        args = self.args
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(self.model.parameters(), args.clip_grad, mode=args.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if args.clip_grad:
                dispatch_clip_grad(self.model.parameters(), args.clip_grad, mode=args.clip_mode)
            self.optimizer.step()
        if self.ema is not None:
            # the count of updates with this one, as timm's train.py passes it: the first copies the weights
            self.ema.update(self.model, step=self.progress.global_step + 1)

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs; write results.json and the plots; return the results."""
        args, p = self.args, self.progress
        self._announce()
        evaluated: dict[str, dict[str, Any]] = {}
        with StopSignal() as stop:
            while p.epoch < args.epochs:
                stopping = self.train_epoch(stop)
                if stopping and p.step < self.steps_per_epoch:
                    self._save(p.epoch - 1, None, best=False)
                    raise Interrupted(stop.signum or signal.SIGTERM, self.run_dir / checkpoint.LAST)
                eval_start = time.perf_counter()
                last = p.epoch + 1 == args.epochs
                evaluated = self._evaluate() if last or (p.epoch + 1) % args.eval_interval == 0 else {}
                top1 = evaluated["plain"]["top1"] if evaluated else None
                row = self._epoch_row(evaluated, eval_start)
                p.rows.append(row)
                best = top1 is not None and top1 > p.best_top1
                if best:
                    p.best_top1, p.best_epoch = top1, p.epoch
                self.scheduler.step(p.epoch + 1, top1)
                self.log(epoch_line(row, args.epochs))
                completed = p.epoch
                p.epoch, p.step, p.loss_sum, p.loss_count, p.epoch_time = p.epoch + 1, 0, 0.0, 0, 0.0
                self._save(completed, top1, best)
                if stopping and p.epoch < args.epochs:
                    raise Interrupted(stop.signum or signal.SIGTERM, self.run_dir / checkpoint.LAST)
                if stopping:  # nothing left to resume: a finished run writes its results
                    self.log("note   the stop came as the last epoch ended: writing the run's results")
        return self._finish(evaluated)

    def _epoch_row(self, evaluated: dict[str, dict[str, Any]], eval_start: float) -> dict[str, Any]:
        """The epoch's summary.csv row: train loss (mean over every process's steps), the figures of each evaluated
        model ("plain" unprefixed, "merged_", "ema_"), learning rate, and time (training plus evaluation)."""
        p = self.progress
        loss_sum, loss_count = distributed.sums([p.loss_sum, p.loss_count], self.ctx)
        row = {"epoch": p.epoch, "train_loss": loss_sum / max(loss_count, 1)}
        for prefix, name in (("", "plain"), ("merged_", "merged"), ("ema_", "ema")):
            if name in evaluated:
                m = evaluated[name]
                row.update({f"{prefix}eval_loss": m["nll"], f"{prefix}eval_top1": m["top1"],
                            f"{prefix}eval_ece": m["ece"]} | ({"eval_top5": m["top5"]} if not prefix else {}))
        row.update(lr=self.optimizer.param_groups[0]["lr"], epoch_time=p.epoch_time + time.perf_counter() - eval_start)
        return row

    def _evaluate(self) -> dict[str, dict[str, Any]]:
        """The evaluation set's figures: "plain", and "merged" (--eval-merged) and "ema" (--model-ema)."""
        args, ctx = self.args, self.ctx
        run = functools.partial(evaluate, loader=self.eval_loader, num_classes=args.num_classes,
                                n_bins=args.ece_bins, device=ctx.device, amp_dtype=self.amp_dtype, show=ctx.is_main)
        evaluated = {"plain": run(self.eval_model)}
        if args.eval_merged:
            with self.objective.trained_forward(self.eval_model):
                evaluated["merged"] = run(self.eval_model, desc="eval merged")
        if self.ema is not None:
            evaluated["ema"] = run(self.ema.module, desc="eval ema")
        return evaluated

    def _announce(self) -> None:
        args, ctx, d = self.args, self.ctx, self.data
        self.log(f"data   {args.dataset}: {len(d.train)} train / {len(d.eval)} eval images, "
                 f"{d.img_size}x{d.img_size}x{d.in_chans}, {d.num_classes} classes")
        self.log(f"model  {args.model}: {models.describe(self.model)}")
        patches = getattr(getattr(self.model, "patch_embed", None), "num_patches", None)
        if patches is not None and patches < 4:  # e.g. a 224-px model's patch 16 on 16-px digits
            self.log(f"note   {args.model} cuts the {d.img_size}x{d.img_size} images into {patches} patch(es): "
                     f"patch-level mixing and merging have next to nothing to work with; --model-kwargs "
                     f"patch_size=N gives patches of N pixels")
        self.log(f"mix    {args.mix} ({self.objective.passes}) {self.objective.defaults() or ''}")
        if self.unused_options:
            self.log(f"note   --mix {args.mix} takes no {', '.join(f'{k}={v}' for k, v in self.unused_options.items())}: "
                     f"ignored (its options: `mergemix methods`; set them with --mix-alpha or --mix-opt)")
        ignored = data.ignored_augmentation(args, config.train_defaults())
        if ignored:
            self.log(f"note   {', '.join(ignored)}: ignored, {args.dataset} has its own fixed augmentation "
                     f"(these flags shape the RGB data sets': {', '.join(d for d in data.LOADERS if d not in data.GREY_DATASETS)})")
        for note in schedule_notes(args) + self.objective.notes():
            self.log(f"note   {note}")
        self.log(f"train  {args.epochs} epochs x {self.steps_per_epoch} steps, batch {args.batch_size} x "
                 f"{ctx.world_size} process(es), {args.opt} lr {args.lr:g}, {ctx.device}"
                 + (f", amp {args.amp_dtype}" if args.amp else "") + (", compiled" if args.compile else ""))
        self.log(f"output {self.run_dir}")

    def _finish(self, evaluated: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """results.json from the last epoch's figures (``_evaluate``'s)."""
        args, p = self.args, self.progress
        if not self.ctx.is_main:
            return {}
        metrics = evaluated["plain"]
        from .plots import training_curves

        extra: dict[str, Any] = {
            "epochs": args.epochs, "best_top1": p.best_top1, "best_epoch": p.best_epoch,
            "train_time_s": sum(r["epoch_time"] for r in p.rows), "method": args.mix, "model": args.model,
            "dataset": args.dataset, "num_images": len(self.data.eval), "seed": args.seed,
            "ece_bins": args.ece_bins, "world_size": self.ctx.world_size,
        }
        for name in ("ema", "merged"):
            if name in evaluated:
                extra[name] = {k: evaluated[name][k] for k in RESULT_KEYS}
        title = f"{models.label(args.model, args.model_kwargs)}\n--mix {args.mix} on {args.dataset}"
        results = write_results(self.run_dir, metrics, extra, title=title)
        with checkpoint.atomic_path(self.run_dir / "curves.png") as tmp:
            training_curves(self.run_dir / "summary.csv", tmp)
        self.log(f"final  {summary_line(metrics)}  on {len(self.data.eval)} held-out images, "
                 f"{extra['train_time_s']:.0f}s -> {self.run_dir}")
        if p.best_epoch >= 0:  # timm prints its best metric too: the final epoch need not be the best
            self.log(f"best   top-1 {p.best_top1:.2f} % at epoch {p.best_epoch + 1}/{args.epochs} (as the epoch "
                     f"lines count; best_epoch {p.best_epoch} in results.json): {checkpoint.BEST}")
        for name, what in (("merged", "the model merged as it trained"), ("ema", "the weights' EMA")):
            if name in evaluated:
                self.log(f"{name:<6} {summary_line(evaluated[name])}  ({what})")
        return results


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``mergemix train`` with parsed arguments (under torchrun: one call per process).

    A run that fails before its first checkpoint removes the run folder it created, and the
    ``--output`` folders it created for it while they are empty.
    """
    ctx = distributed.setup(args.device)
    trainer = None
    try:
        trainer = Trainer(args, ctx)
        return trainer.fit()
    except BaseException:
        if trainer is not None and trainer.made_dir is not None and not (trainer.run_dir / checkpoint.LAST).exists():
            checkpoint.remove_dir(trainer.run_dir, trainer.made_dir)
        raise
    finally:
        distributed.cleanup()
