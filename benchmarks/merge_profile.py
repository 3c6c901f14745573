"""Where the time of a ToMe-merged forward goes, against the plain timm model (evaluation, no grad).

    python benchmarks/merge_profile.py --device cuda      # DeiT-S/224, batch 256, bf16

Times, each the median of interleaved calls in one run: plain; merged (merge_num 98) with and
without proportional attention, and merging in every 2nd block only; merged with the source
index tracked to a read-out block. On
CUDA also: merged with SDPA held to the memory-efficient kernel (its log-size bias makes the
default cuDNN kernel slower per token than the unbiased one), each one replayed as a CUDA graph
(the GPU time alone, no launch overhead), the profiler's top kernels of the plain and the
merged forward, and the compile time and speed of plain and merged under torch.compile.
Prints a report; writes it as JSON with --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_common import as_graph, at_least, median_ms, merged_copy, one_line_errors, profile_parser, save_json, sync
from mergemix.mix.mergemix import default_readout_block


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = profile_parser(__doc__, reps=20)
    p.add_argument("--readout-block", type=at_least(0), default=None,
                   help="0-based block the source index is tracked to (default: the library's, 8 of 12 blocks)")
    return p.parse_args(argv)


def compile_and_time(net: torch.nn.Module, x: torch.Tensor, device: torch.device, reps: int) -> dict[str, float]:
    """torch.compile ``net``: seconds of its first call (compiling included), then ms per call."""
    fn = torch.compile(net)
    t = time.perf_counter()
    fn(x)
    sync(device)
    first = time.perf_counter() - t
    return {"compile_and_first_call_s": first, "ms": median_ms({"compiled": lambda: fn(x)}, device, reps)["compiled"]}


def efficient_attention(net: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """The merged forward with SDPA held to the memory-efficient kernel (None where it can't run)."""
    def call():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return net(x)
    try:
        call()
    except RuntimeError as e:
        print(f"memory-efficient attention unavailable: {str(e).splitlines()[0]}", flush=True)
        return None
    return call


def build_nets(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The plain model and its merged variants, on ``args.device``, in evaluation mode."""
    base = timm.create_model(args.model).to(args.device).eval()
    readout = args.readout_block if args.readout_block is not None else default_readout_block(len(base.blocks))
    return {"plain": base,
            "merged": merged_copy(base, merge_num=args.merge_num),
            "merged_every2": merged_copy(base, merge_num=args.merge_num, merge_every=2),
            "merged_no_prop_attn": merged_copy(base, merge_num=args.merge_num, prop_attn=False),
            f"merged_index_to_block_{readout}": merged_copy(base, merge_num=args.merge_num, readout_block=readout)}


def profile_tables(calls: dict, device: torch.device) -> dict[str, str]:
    """The profiler's top kernels (by self CUDA time) of 3 calls of the plain and the merged forward."""
    tables = {}
    for k in ("plain", "merged"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                calls[k]()
            sync(device)
        tables[f"{k}_profile_3_calls"] = table = prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
        print(k, table, sep="\n", flush=True)
    return tables


@one_line_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = cuda  # as training does
    nets = build_nets(args)
    x = torch.randn(args.batch_size, 3, *nets["plain"].patch_embed.img_size, device=device)
    dtype = torch.bfloat16 if cuda else torch.float32
    report: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                    "timm": timm.__version__, "cudnn_benchmark": cuda, "model": args.model, "batch": args.batch_size,
                    "merge_num": args.merge_num}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=cuda):
        calls = {k: (lambda n=n: n(x)) for k, n in nets.items()}
        if cuda:
            efficient = efficient_attention(nets["merged"], x)
            if efficient is not None:
                calls["merged_efficient_attn"] = efficient
        report["eager_ms"] = median_ms(calls, device, args.reps)
        print("eager ms:", {k: round(v, 2) for k, v in report["eager_ms"].items()}, flush=True)
        save_json(report, args.out)
        if cuda:
            report["cuda_graph_ms"] = median_ms({k: as_graph(f) for k, f in calls.items()}, device, args.reps)
            print("CUDA-graph replay ms:", {k: round(v, 2) for k, v in report["cuda_graph_ms"].items()}, flush=True)
            report.update(profile_tables(calls, device))
            save_json(report, args.out)
        if not args.no_compile:
            report["compiled"] = {}
            for k in ("plain", "merged"):
                report["compiled"][k] = r = compile_and_time(nets[k], x, device, args.reps)
                print(f"compiled {k}: first call {r['compile_and_first_call_s']:.1f} s, {r['ms']:.2f} ms", flush=True)
                save_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
