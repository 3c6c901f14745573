r"""Training-step cost of every mixing method, as ratios to CutMix measured in the same run.

    python benchmarks/step_time.py                       # CPU, small ViT
    python benchmarks/step_time.py --device cuda --model deit_small_patch16_224 --img-size 224 \
        --batch-size 256 --amp bfloat16 [--compile] [--compile-scope blocks]

Steps of all configurations are interleaved (round-robin), so drift of the machine hits every
configuration alike; the median over the timed rounds is reported. Also measured: the mask work
alone (recover, top-k, upsample, mix) as a share of a MergeMix step, and evaluation throughput
of the ToMe-merged model against the plain timm model, in the same mode. Eager runs also count
the ATen ops of one forward and backward that do work: each launches at least one kernel on a GPU,
where eager steps that launch many small ones can wait for the host.
Writes benchmarks/results/step_time_<device>[_compiled[_<mode>][_blocks]][_every<K-K...>][_noprop|_prop-on-off][_<tag>].json
and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

import mergemix.mix as mix
from bench_common import (as_graph, at_least, device, median_ms, model_name, one_line_errors, output_file, provenance,
                          seconds, sync)
from mergemix import mask as M
from mergemix import models, tome
from mergemix.config import COMPILE_MODES, key_value
from mergemix.errors import ConfigError
from mergemix.evaluate import autocast as amp_autocast
from mergemix.mix.mergemix import AUX_LOSSES
from mergemix.tome import patch_size, patch_tome, resolve_schedule, tome_options

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "vit_tiny_patch16_224"
CPU_MODEL_KWARGS = {"patch_size": 4, "depth": 6, "embed_dim": 128, "num_heads": 4}
MERGEMIX_CONFIGS = [f"{aux},{merge}" for aux in AUX_LOSSES for merge in ("merge", "nomerge")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--model", type=model_name, default=None,
                   help=f"timm model (default {DEFAULT_MODEL}, on the CPU made small)")
    p.add_argument("--img-size", type=at_least(1), default=32)
    p.add_argument("--model-kwargs", nargs="*", type=key_value, default=None,
                   help="key=value overrides (default: none; for the default model on the CPU "
                        f"{' '.join(f'{k}={v}' for k, v in CPU_MODEL_KWARGS.items())})")
    p.add_argument("--num-classes", type=at_least(2), default=100)
    p.add_argument("--batch-size", type=at_least(2), default=64, help="at least 2: mixing pairs images of a batch")
    p.add_argument("--amp", default=None, choices=[None, "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode, e.g. reduce-overhead (implies --compile)")
    p.add_argument("--compile-scope", default=None, choices=("model", "blocks"),
                   help="whole model (default) or, an experiment, block by block (implies --compile; see compile_model)")
    p.add_argument("--merge-num", type=at_least(0), default=None, help="default: half the patches")
    p.add_argument("--merge-every", type=at_least(1), nargs="+", default=[1], metavar="K",
                   help="MergeMix and merged evaluation merging in every K-th block; several values are timed "
                        "side by side (labels gain ',everyK' for K > 1)")
    p.add_argument("--prop-attn", nargs="+", default=["on"], choices=("on", "off"),
                   help="MergeMix and merged evaluation with ToMe's proportional attention (the log-size "
                        "attention bias) on, off, or both side by side (labels gain ',noprop' for off)")
    p.add_argument("--methods", nargs="*", default=None, choices=mix.available(), metavar="METHOD",
                   help=f"default: every registered method ({', '.join(mix.available())})")
    p.add_argument("--mergemix-configs", nargs="*", default=None, choices=MERGEMIX_CONFIGS, metavar="AUX,MERGE",
                   help=f"MergeMix configurations ({' '.join(MERGEMIX_CONFIGS)}; default: all of them)")
    p.add_argument("--warmup", type=at_least(1), default=3)
    p.add_argument("--steps", type=at_least(1), default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_file, default=None,
                   help="JSON file (a markdown table goes next to it); default: under benchmarks/results/")
    p.add_argument("--tag", type=file_tag, default=None,
                   help="appended to the default file name, e.g. cache-warm for a run after a first one")
    args = p.parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None or args.compile_scope is not None
    args.compile_scope = args.compile_scope or "model"
    args.prop_attn = [v == "on" for v in dict.fromkeys(args.prop_attn)]
    return args


def file_tag(text: str) -> str:
    """A file-name part: letters, digits, '-' and '_' only, so that it cannot leave the results folder."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"letters, digits, '-' and '_' only, got {text!r}")
    return text


def model_kwargs(args: argparse.Namespace) -> dict:
    if args.model_kwargs is not None:
        return dict(args.model_kwargs)
    # the small CPU model only when no --model was named: a named one is taken as it is
    return dict(CPU_MODEL_KWARGS) if args.model is None and args.device.type != "cuda" else {}


def configurations(methods: list[str], merge_num: int | None, mergemix_configs: list[str] | None = None,
                   merge_every: Sequence[int] = (1,), prop_attn: Sequence[bool] = (True,)) -> list[tuple[str, str, dict]]:
    """(label, method, options): each method with defaults, MergeMix in every aux mode, merging on/off
    (or only the ``aux,merge|nomerge`` pairs in ``mergemix_configs``), once per ``merge_every`` and
    proportional-attention setting."""
    configs = []
    for name in methods:
        if name != "mergemix":
            configs.append((name, name, {}))
            continue
        for aux in AUX_LOSSES:
            for merge_train in (True, False):
                key = f"{aux},{'merge' if merge_train else 'nomerge'}"
                if mergemix_configs is not None and key not in mergemix_configs:
                    continue
                for k, prop in variants(merge_every, prop_attn):
                    configs.append((f"mergemix[{key}{variant_suffix(k, prop, ',')}]", name,
                                    {"aux_loss": aux, "merge_train": merge_train, "merge_num": merge_num,
                                     "merge_every": k, "prop_attn": prop}))
    return configs


def variants(merge_every: Sequence[int], prop_attn: Sequence[bool]) -> list[tuple[int, bool]]:
    """Every (merge_every, prop_attn) pair to time, schedules outermost."""
    return [(k, prop) for k in merge_every for prop in prop_attn]


def variant_suffix(k: int, prop_attn: bool, sep: str) -> str:
    """How a label names a merging variant: ``everyK`` for merging in every K-th block (K > 1),
    ``noprop`` without proportional attention; nothing for the defaults."""
    return ("" if k == 1 else f"{sep}every{k}") + ("" if prop_attn else f"{sep}noprop")


def compile_model(model: torch.nn.Module, scope: str, **compile_kwargs) -> torch.nn.Module:
    """``torch.compile`` the whole model (scope "model", what ``mergemix train --compile`` does) or,
    an experiment in regional compilation (scope "blocks"), block by block in place.

    Whole-model compilation bakes each block's token count into its kernels, so a merged
    DeiT-S compiles twelve different blocks where a plain one compiles one. Scope "blocks"
    compiles a plain timm ViT's blocks with ``nn.Module.compile`` (one graph serves them all) and
    ToMe's block step ``tome._run_block`` once per process with dynamic shapes, so that every
    token count shares its graphs (``_run_blocks`` looks the step up by name at each call).
    """
    if scope == "model":
        return torch.compile(model, **compile_kwargs)
    if not hasattr(tome._run_block, "_torchdynamo_orig_callable"):
        # one graph per flag combination (first merge, index tracking, read-out, no-grad pass,
        # merging off), not per block; more than dynamo's default 8 would silently run eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        tome._run_block = torch.compile(tome._run_block, dynamic=True, **compile_kwargs)
    for blk in model.blocks:
        blk.compile(**compile_kwargs)
    return model


class Runner:
    """One configuration: its own model copy, optimizer and objective."""

    def __init__(self, label, method, options, base_model, args, device):
        self.label = label
        self.model = copy.deepcopy(base_model).to(device).train()
        gen = torch.Generator().manual_seed(args.seed)
        self.objective = mix.create(method, args.num_classes, generator=gen, **options)
        self.objective.prepare(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.forward_model = self.model
        self.warmup_s = None
        if args.compile:
            self.forward_model = compile_model(self.model, args.compile_scope, mode=args.compile_mode)
        self.times: list[float] = []
        self.peak: int | None = None
        self.kernel_ops: int | None = None

    def step(self, x, y, autocast, device) -> float:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()  # as the trainer does (matters for reduce-overhead)
        self.forward_backward(x, y, autocast)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t
        if device.type == "cuda":
            self.peak = max(self.peak or 0, torch.cuda.max_memory_allocated(device))
        return dt

    def forward_backward(self, x, y, autocast) -> None:
        """The step's forward (the method's whole objective) and backward, without the optimizer."""
        with autocast():
            out = self.objective(self.forward_model, x, y)
        out.loss.backward()

    def count_fwd_bwd_ops(self, x, y, autocast) -> int:
        """Kernel-launching ops of one forward and backward. The optimizer's are left out: the same for
        every method, and many more on the CPU (one loop per parameter) than on a GPU (foreach kernels)."""
        count = count_kernel_ops(lambda: self.forward_backward(x, y, autocast))
        self.opt.zero_grad(set_to_none=True)
        return count


class KernelOpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside it, forward and backward, that compute something: each
    launches at least one kernel on a GPU. Views and bare allocations launch none and are left out."""

    NO_KERNEL = {"_unsafe_view", "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in self.NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_kernel_ops(fn) -> int:
    """ATen ops that do work (see ``KernelOpCounter``) in one call of ``fn``."""
    with KernelOpCounter() as counter:
        fn()
    return counter.count


def time_fn(fn, device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after one warm-up."""
    return median_ms({"fn": fn}, device, reps)["fn"] / 1e3


def mask_work_seconds(runner: Runner, x, device, reps: int) -> float:
    """Recover, top-k, upsample and mix on a real read-out, without the forwards."""
    net = runner.model
    with torch.no_grad(), tome_options(net, merge=True, readout=True):
        net(x)
    ro = net.tome_readout
    partner = M.derangement(x.shape[0], device=device)
    grid, patch = ro.grid, patch_size(net)

    def work():
        _, _, m = M.attention_mask(ro.attn, ro.index, 0.6, grid, patch, x.shape[-2:])
        return M.mix_images(x, partner, m)

    return time_fn(work, device, reps)


def eval_throughput(base_model, x, merge_num, args, device, autocast) -> dict:
    """Images/s of a no-grad forward: plain timm model vs the same weights merged (keys ``merged``,
    ``merged_everyK`` for each K of ``--merge-every`` above 1, ``..._noprop`` without proportional attention).

    The timed forwards are interleaved round-robin, as the training steps are, so that drift of the
    machine hits plain and merged alike; each figure is the median of its rounds."""
    nets = [("plain", copy.deepcopy(base_model).to(device).eval())]
    for k, prop in variants(args.merge_every, args.prop_attn):
        merged = patch_tome(copy.deepcopy(base_model).to(device).eval(), merge_num=merge_num, merge_every=k,
                            prop_attn=prop)
        nets.append((f"merged{variant_suffix(k, prop, '_')}", merged))
    out, forwards = {}, {}
    reps = max(args.steps, 5)
    with torch.no_grad(), autocast():
        for name, net in nets:
            compiled = compile_model(net, args.compile_scope, mode=args.compile_mode) if args.compile else net

            def forward(fwd=compiled):
                # each call a new CUDA-graph generation, as in evaluate(): once the training steps above
                # have marked theirs, unmarked calls never leave reduce-overhead's warm-up, where every
                # kernel is launched one by one (the merged forward then ran at eager speed)
                torch.compiler.cudagraph_mark_step_begin()
                return fwd(x)

            t0 = time.perf_counter()
            forward()
            sync(device)
            out[f"{name}_first_call_s"] = time.perf_counter() - t0
            forward()  # a warm-up call, as time_fn makes
            forwards[name] = forward
            if args.compile and device.type == "cuda":
                # the uncompiled forward captured as a CUDA graph by hand: its GPU time alone, a
                # yardstick for the compiled one (reduce-overhead should be no slower)
                try:
                    replay = as_graph(lambda net=net: net(x))
                    out[f"{name}_eager_graph_images_per_s"] = x.shape[0] / time_fn(replay, device, reps)
                except RuntimeError as e:  # a yardstick only: the compiled figures stand without it
                    print(f"{name}: no hand-captured CUDA graph: {str(e).splitlines()[0]}", file=sys.stderr)
        rounds: dict[str, list[float]] = {name: [] for name in forwards}
        for _ in range(reps):
            for name, forward in forwards.items():
                rounds[name].append(seconds(forward, device))
    for name, times in rounds.items():
        out[f"{name}_images_per_s"] = x.shape[0] / statistics.median(times)
    for name, _ in nets[1:]:
        out[f"{name}_speedup"] = out[f"{name}_images_per_s"] / out["plain_images_per_s"]
    return out


def build_runners(args: argparse.Namespace, base: nn.Module, merge_num: int, device: torch.device) -> list[Runner]:
    """One Runner per configuration (CutMix always among them: the ratios' baseline), checked first:
    a merge schedule or method that does not fit the model fails before minutes of timing."""
    L = base.patch_embed.num_patches
    for k in args.merge_every:
        try:
            resolve_schedule(L, len(base.blocks), merge_num=merge_num, merge_every=k)
        except ValueError as e:
            raise ConfigError(f"--merge-num {merge_num} --merge-every {k} does not fit {L} patches: {e}") from None
    methods = args.methods or mix.available()
    if "cutmix" not in methods:
        methods = ["cutmix", *methods]
    runners = []
    for label, method, options in configurations(methods, merge_num, args.mergemix_configs, args.merge_every,
                                                 args.prop_attn):
        try:
            runners.append(Runner(label, method, options, base, args, device))
        except ValueError as e:  # a method that does not fit the model (e.g. its read-out block)
            raise ConfigError(f"{label} does not fit {args.model or DEFAULT_MODEL}: {e}") from None
    return runners


def time_steps(runners: list[Runner], x: Tensor, y: Tensor, autocast: Callable, args: argparse.Namespace,
               device: torch.device) -> None:
    """Warm each runner up, then time ``args.steps`` rounds of one step per runner, interleaved so that
    a slow spell of the machine falls on every configuration alike."""
    for r in tqdm(runners, desc="warm-up", file=sys.stderr):
        t = time.perf_counter()
        for _ in range(args.warmup):
            r.step(x, y, autocast, device)
        # eager too: a first step also builds cuDNN's plans, one per attention shape, which a
        # merged model has many of; the compiled warm-up includes the same cost
        r.warmup_s = time.perf_counter() - t
        if not args.compile:  # a compiled step runs Inductor's kernels, which the dispatcher does not see
            r.kernel_ops = r.count_fwd_bwd_ops(x, y, autocast)
    for _ in tqdm(range(args.steps), desc="timed rounds", file=sys.stderr):
        for r in runners:
            r.times.append(r.step(x, y, autocast, device))


def step_rows(runners: list[Runner]) -> dict[str, dict[str, Any]]:
    """Each configuration's figures, its median step time also as a ratio to CutMix's."""
    cutmix = statistics.median(next(r for r in runners if r.label == "cutmix").times)
    rows = {}
    for r in runners:
        med = statistics.median(r.times)
        rows[r.label] = {"method": r.objective.name, "passes": r.objective.passes, "median_step_ms": med * 1e3,
                         "ratio_to_cutmix": med / cutmix, "peak_memory_mb": r.peak / 2**20 if r.peak else None,
                         "warmup_s": r.warmup_s, "step_ms": [round(t * 1e3, 2) for t in r.times],
                         "kernel_ops_fwd_bwd": r.kernel_ops}
    return rows


def output_path(args: argparse.Namespace, device: torch.device) -> Path:
    """--out, else ``results/step_time_<device>[_compiled][_<mode>][_blocks][_every..][_noprop..][_<tag>].json``."""
    if args.out:
        return args.out
    tag = "cuda" if device.type == "cuda" else "cpu"
    mode = f"_{args.compile_mode}" if args.compile_mode not in (None, "default") else ""
    scope = "_blocks" if args.compile_scope == "blocks" else ""
    every = "" if args.merge_every == [1] else "_every" + "-".join(map(str, args.merge_every))
    prop = "" if args.prop_attn == [True] else "_noprop" if args.prop_attn == [False] else "_prop-on-off"
    suffix = f"_{args.tag}" if args.tag else ""
    return RESULTS / f"step_time_{tag}{'_compiled' if args.compile else ''}{mode}{scope}{every}{prop}{suffix}.json"


def mask_work(runners: list[Runner], x: Tensor, device: torch.device, steps: int) -> dict[str, Any] | None:
    """The mask work as a share of a MergeMix step: of the `clean` one, the method's default, when it
    ran, else of the first MergeMix configuration (so a GPU run can time `none` alone); None without one."""
    mergemix_runners = sorted((r for r in runners if r.label.startswith("mergemix[")),
                              key=lambda r: r.label != "mergemix[clean,merge]")
    if not mergemix_runners:
        return None
    mm = mergemix_runners[0]
    mask_s = mask_work_seconds(mm, x, device, max(steps, 5))
    return {"ms": mask_s * 1e3, "share_of_mergemix_step": mask_s / statistics.median(mm.times), "measured_on": mm.label}


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    base = models.create(args.model or DEFAULT_MODEL, num_classes=args.num_classes, img_size=args.img_size,
                         in_chans=3, model_kwargs=model_kwargs(args))
    L = base.patch_embed.num_patches
    merge_num = args.merge_num if args.merge_num is not None else L // 2
    runners = build_runners(args, base, merge_num, device)
    autocast = functools.partial(amp_autocast, device, getattr(torch, args.amp) if args.amp else None)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does (see Trainer)
    time_steps(runners, x, y, autocast, args, device)

    result = {
        **provenance(device, torch.get_num_threads()),
        "settings": {"model": args.model or DEFAULT_MODEL, "model_kwargs": model_kwargs(args), "img_size": args.img_size,
                     "num_patches": L, "batch_size": args.batch_size, "amp": args.amp, "compile": args.compile,
                     "compile_mode": args.compile_mode, "compile_scope": args.compile_scope, "merge_num": merge_num,
                     "merge_every": args.merge_every, "prop_attn": args.prop_attn,
                     "warmup": args.warmup, "steps": args.steps,
                     "cudnn_benchmark": torch.backends.cudnn.benchmark},
        "configs": step_rows(runners),
    }
    out = output_path(args, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compile:  # the training passes' compile figures, kept even if the rest runs out of time
        result.update(compile_record())
    write(result, out)  # the step times are kept even if the rest runs out of time
    if (work := mask_work(runners, x, device, args.steps)) is not None:
        result["mask_work"] = work
    result["eval_throughput"] = eval_throughput(base, x, merge_num, args, device, autocast)
    if args.compile:  # now with the evaluation's graphs
        result.update(compile_record())
    print(write(result, out))
    return 0


def compile_record() -> dict[str, dict]:
    """This process's compilations so far: counters and seconds by phase."""
    return {"compile_diagnostics": compile_diagnostics(), "compile_phase_s": compile_phase_seconds()}


def compile_diagnostics() -> dict[str, int]:
    """What this process's compilations did that can slow a compiled run: graphs compiled, graph
    breaks, and Inductor's CUDA-graph counters (``cudagraph_skips``: graphs that run without replay)."""
    counters = torch._dynamo.utils.counters
    return {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            **{k: v for k, v in counters["inductor"].items() if k.startswith("cudagraph")}}


# where a compile's seconds go: torch's own timers (``dynamo_timed``), by name, and what each covers
COMPILE_PHASES = {
    "bytecode_tracing": "Dynamo tracing",
    "aot_trace_joint_graph": "AOT autograd tracing",
    "compile_fx.<locals>.fw_compiler_base": "Inductor on forward and no-grad graphs",
    "compile_fx.<locals>.bw_compiler": "Inductor on backward graphs",
    "GraphLowering.codegen": "of which code generation",
    "async_compile.wait": "of which waiting for kernel compiles",
    "CachingAutotuner.benchmark_all_configs": "Triton autotuning at first calls",
    "CUDAGraphNode.record": "CUDA-graph recording",
}


def compile_phase_seconds() -> dict[str, float]:
    """Seconds this process spent in each of ``COMPILE_PHASES`` (summed over graphs; 0 if never
    entered), so that a slow compile on a GPU shows whether tracing, Inductor's code generation,
    kernel compiles or first-call autotuning took the time."""
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    seconds = dict(zip(names, values))
    return {k: round(float(seconds.get(k, 0.0)), 2) for k in COMPILE_PHASES}


def write(result: dict, out: Path) -> str:
    """Write the JSON and its markdown table; return the table."""
    out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    out.with_suffix(".md").write_text(table + "\n")
    return table


def markdown(result: dict) -> str:
    s, configs = result["settings"], result["configs"]
    # eager runs count the kernel-launching ops of a forward and backward (compiled runs and files
    # from before the count have none)
    ops = all(r.get("kernel_ops_fwd_bwd") for r in configs.values()) and "cutmix" in configs
    lines = [f"Device: {result['device']}; model {s['model']} {s['model_kwargs']} at {s['img_size']} px, "
             f"{s['num_patches']} patches, batch {s['batch_size']}, amp {s['amp']}, compile {s['compile']}"
             + (f" ({s['compile_mode']})" if s.get("compile_mode") else "")
             + (" (blocks)" if s.get("compile_scope") == "blocks" else "") + ", "
             f"merge_num {s['merge_num']}"
             + (f" merged in every K-th block for K in {s['merge_every']}" if s.get("merge_every", [1]) != [1] else "")
             + ("" if s.get("prop_attn", [True]) == [True] else
                ", proportional attention " + " and ".join("on" if p else "off (noprop)" for p in s["prop_attn"]))
             + f"; median of {s['steps']} interleaved steps.", "",
             "| configuration | passes per step | step (ms) | × CutMix | peak memory (MB) | warm-up"
             + (" incl. compile" if s["compile"] else "") + " (s) |" + (" ATen ops, fwd + bwd (× CutMix) |" if ops else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if ops else "")]
    # replayed CUDA graphs allocate nothing (their memory was taken when they were recorded), so a
    # per-step peak under reduce-overhead says nothing about a method's memory: the table omits it
    graphs = s.get("compile_mode") == "reduce-overhead"
    for label, r in sorted(configs.items(), key=lambda kv: kv[1]["ratio_to_cutmix"]):
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] and not graphs else "–"
        lines.append(f"| {label} | {r['passes']} | {r['median_step_ms']:.1f} | {r['ratio_to_cutmix']:.2f} | {mem} "
                     f"| {r['warmup_s']:.1f} |" + (f" {r['kernel_ops_fwd_bwd']} "
                     f"({r['kernel_ops_fwd_bwd'] / configs['cutmix']['kernel_ops_fwd_bwd']:.2f}) |" if ops else ""))
    if any(r["peak_memory_mb"] for r in configs.values()) and not graphs:
        lines += ["", "Peak memory: the most allocated during a timed step, including every configuration's resident "
                      "model and optimizer state (all share the device): compare it within this table, not across files."]
    if s["compile"] and sum(label.startswith("mergemix[") for label in configs) > 1:
        # dynamo caches compiled code per code object, not per model: a later configuration with the
        # same shapes and flags reuses what an earlier one compiled
        lines += ["", "Warm-up seconds follow the run order: a MergeMix configuration can reuse graphs that an "
                      "earlier one compiled, so compare compile times between processes, not within this run."]
    if "mask_work" in result:
        mw = result["mask_work"]
        lines += ["", f"Mask work (recover + top-k + upsample + mix): {mw['ms']:.2f} ms, "
                      f"{100 * mw['share_of_mergemix_step']:.1f} % of a "
                      f"{mw.get('measured_on', 'mergemix[clean,merge]')} step."]
    if "eval_throughput" in result:
        ev = result["eval_throughput"]
        names = [k[: -len("_speedup")] for k in ev if k.endswith("_speedup")]
        merged = ", ".join(f"{n.replace('_', ' ')} {ev[n + '_images_per_s']:.0f} img/s ({ev[n + '_speedup']:.2f}×)"
                           for n in names)
        first = ("; first call incl. compile: " + ", ".join(f"{n.replace('_', ' ')} {ev[n + '_first_call_s']:.0f} s"
                                                            for n in ["plain", *names]) if s["compile"] else "")
        lines.append(f"Evaluation throughput: plain {ev['plain_images_per_s']:.0f} img/s, {merged}{first}.")
        graphs = [n for n in ["plain", *names] if f"{n}_eager_graph_images_per_s" in ev]
        if graphs:
            lines.append("The uncompiled forwards as CUDA graphs captured by hand: " + ", ".join(
                f"{n.replace('_', ' ')} {ev[n + '_eager_graph_images_per_s']:.0f} img/s" for n in graphs) + ".")
    if "compile_diagnostics" in result:
        lines.append("Compilation: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                 for k, v in result["compile_diagnostics"].items()) + ".")
    if "compile_phase_s" in result:
        lines.append("Compile seconds by phase, summed over graphs: " + "; ".join(
            f"{COMPILE_PHASES[k]} {v:.1f}" for k, v in result["compile_phase_s"].items()) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
