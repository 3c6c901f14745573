"""Where the time of a merged training pass goes, against the plain timm model (forward + backward).

    python benchmarks/train_profile.py --device cuda      # DeiT-S/224, batch 256, bf16

A merged training pass saves fewer milliseconds than its token count predicts: on an H200,
compiled, 30.1 ms against 29.1 ms plain, while its kernels take 24.0 against 27.4 ms of GPU
time, i.e. the merged pass is bound by launching its many small kernels. This times one forward +
backward (soft-target cross-entropy, no optimizer) of the plain model and of the same weights
merged at merge_num 98 (also merging in every 2nd block only, ``merged_every2``), eager and under
torch.compile, in the same run, and keeps the profiler's top kernels of each by self CUDA time, so
the merge's own kernels (gathers, scatters, the masked attention and their backwards) can be read
off. Prints a report; writes it as JSON with --out.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import timm
import torch

from bench_common import at_least, median_ms, merged_copy, one_line_errors, profile_parser, save_json, sync
from mergemix.config import COMPILE_MODES
from mergemix.errors import ConfigError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = profile_parser(__doc__, reps=10)
    p.add_argument("--img-size", type=at_least(1), default=224)
    p.add_argument("--rows", type=at_least(1), default=25, help="kernels kept per profile")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, help="torch.compile mode")
    args = p.parse_args(argv)
    if args.no_compile and args.compile_mode is not None:
        p.error("--compile-mode has no effect with --no-compile; drop one of them")
    return args


def create_vit(name: str, img_size: int) -> torch.nn.Module:
    try:
        return timm.create_model(name, img_size=img_size)
    except TypeError as e:  # a model without img_size is no ViT, which merging needs anyway
        raise ConfigError(f"--model {name} is not a timm ViT: {e}") from None


def training_pass(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """One forward + backward under bf16 autocast on CUDA (float32 on CPU); gradients discarded."""
    def run():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y, label_smoothing=0.1)
        loss.backward()
        net.zero_grad(set_to_none=True)
    return run


def profile_table(fn, device: torch.device, rows: int) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90)


@one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    base = create_vit(args.model, args.img_size).to(device).train()
    nets = {"plain": base, "merged": merged_copy(base, merge_num=args.merge_num),
            "merged_every2": merged_copy(base, merge_num=args.merge_num, merge_every=2)}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, base.num_classes, (args.batch_size,), device=device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "timm": timm.__version__, "model": args.model,
                    "batch": args.batch_size, "merge_num": args.merge_num,
                    "compile_mode": args.compile_mode}
    modes = {"eager": {k: training_pass(n, x, y, device) for k, n in nets.items()}}
    if not args.no_compile:
        modes["compiled"] = {k: training_pass(torch.compile(n, mode=args.compile_mode), x, y, device) for k, n in nets.items()}
    for mode, calls in modes.items():
        report[mode] = {"ms": median_ms(calls, device, args.reps)}  # the first call compiles
        for k in [k for k in nets if k != "plain"]:
            report[mode][f"{k}_over_plain"] = report[mode]["ms"][k] / report[mode]["ms"]["plain"]
        print(mode, {k: round(v, 2) for k, v in report[mode]["ms"].items()}, flush=True)
        for k, fn in calls.items():
            report[mode][f"{k}_profile_3_passes"] = table = profile_table(fn, device, args.rows)
            print(f"{mode} {k}", table, sep="\n", flush=True)
        save_json(report, args.out)  # after each mode, so a timeout in compiling keeps the eager report
    return 0


if __name__ == "__main__":
    sys.exit(main())
