"""What SDPA's additive key bias costs, per backend and sequence length (an experiment, kept as evidence).

    python benchmarks/sdpa_bias.py --device cuda --out benchmarks/results/sdpa_bias_cuda.json
    python benchmarks/sdpa_bias.py --check      # CPU: each biased form against explicit softmax (--out: as JSON)

Proportional attention adds log(size) to the logits as a (B, 1, 1, N) float mask. On an H200 the
merged model's attention took 143 µs per call with that mask against 86 µs unmasked at more
tokens (benchmarks/merge_profile.py). This times one attention call of DeiT-S's shape (batch
256, 6 heads, 64 channels, bf16) at the token counts a merge_num-98 schedule passes through,
forward alone and forward + backward, in these forms:

- ``plain``: no mask (the bound);
- ``bias``: the library's (B, 1, 1, N) mask, SDPA's default backend choice;
- ``bias_cudnn``, ``bias_efficient``: the same mask with the backend forced;
- ``bias_pad8``: keys and values zero-padded to a multiple of 8 and the pads masked with -inf,
  so the mask's rows are 16-byte aligned and no backend has to pad or copy it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_common import at_least, device, output_file, save_json
from mergemix.merge import decreasing_schedule, token_counts

TOKENS = token_counts(197, decreasing_schedule(98, 12))  # entering DeiT-S/224's blocks at merge_num 98: 197 ... 103


def padded(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, multiple: int = 8) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keys/values (B, H, N, D) zero-padded to a multiple of ``multiple``; bias (B, 1, 1, N) gets -inf there."""
    pad = -k.shape[2] % multiple
    if pad == 0:
        return q, k, v, bias
    return (q, F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)),
            F.pad(bias, (0, pad), value=float("-inf")))


def attention(form: str, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """One SDPA call in the given form (see the module docstring)."""
    backend = {"bias_cudnn": SDPBackend.CUDNN_ATTENTION, "bias_efficient": SDPBackend.EFFICIENT_ATTENTION}.get(form)
    ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with ctx:
        if form == "plain":
            return F.scaled_dot_product_attention(q, k, v)
        if form == "bias_pad8":
            q, k, v, bias = padded(q, k, v, bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def inputs(B: int, H: int, N: int, D: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    size = torch.randint(1, 5, (B, N), device=device).float()
    return q, k, v, size.log()[:, None, None, :].to(dtype)


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median ms of one kernel call, by CUDA events: bench_common's host timer would count the launch too,
    which for calls this small is much of the time."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check() -> dict:
    """Largest difference of each biased form from an explicit float64 softmax (CPU, float32)."""
    q, k, v, bias = inputs(2, 3, 13, 8, torch.device("cpu"), torch.float32)
    ref = (((q.double() @ k.double().transpose(-1, -2)) * 8 ** -0.5 + bias.double()).softmax(-1) @ v.double())
    return {form: (attention(form, q, k, v, bias).double() - ref).abs().max().item()
            for form in ("bias", "bias_pad8")}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--check", action="store_true", help="only the exactness check (CPU)")
    p.add_argument("--reps", type=at_least(1), default=20)
    p.add_argument("--out", type=output_file, default=None)
    args = p.parse_args(argv)
    if not args.check and args.device.type != "cuda":
        p.error("timing needs a CUDA device (--device cuda); on the CPU run --check")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        diffs = check()
        print(json.dumps(diffs, indent=1))
        save_json(diffs, args.out)
        return 0
    device = args.device
    torch.manual_seed(0)
    forms = ("plain", "bias", "bias_cudnn", "bias_efficient", "bias_pad8")
    report: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                    "shape": "B 256, H 6, D 64, bf16", "unit": "ms per call, median", "forward": {}, "forward_backward": {}}
    for N in TOKENS:
        q, k, v, bias = inputs(256, 6, N, 64, device, torch.bfloat16)
        grad = torch.randn_like(q)
        for form in forms:
            def fwd(form=form):
                with torch.no_grad():
                    attention(form, q, k, v, bias)

            def fwd_bwd(form=form):
                torch.autograd.grad(attention(form, q, k, v, bias), (q, k, v), grad)

            for key, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
                try:
                    report[key].setdefault(form, {})[N] = round(median_ms(fn, device, args.reps), 4)
                except RuntimeError as e:  # a forced backend may refuse this shape
                    report[key].setdefault(form, {})[N] = f"failed: {str(e).splitlines()[0][:120]}"
        print(N, {form: report["forward_backward"][form][N] for form in forms}, flush=True)
        save_json(report, args.out)  # after each token count, so a later failure keeps the earlier ones
    for key in ("forward", "forward_backward"):
        report[f"{key}_sum_over_blocks"] = {
            form: round(sum(v for v in ms.values() if isinstance(v, float)), 3) for form, ms in report[key].items()}
    print(json.dumps({k: v for k, v in report.items() if k.endswith("sum_over_blocks")}, indent=1))
    save_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
