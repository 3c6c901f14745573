"""Proportional attention three ways, on the merged evaluation forward (an experiment, kept as evidence).

    python benchmarks/prop_attn_variants.py --device cuda     # DeiT-S/224, batch 256, bf16
    python benchmarks/prop_attn_variants.py --device cuda --forms plain mask flex_score_mod

The library adds log(size) to the attention logits as a (B, 1, 1, N) SDPA mask, and on an H200
the cuDNN kernel with that mask is slower per token than without it. Two mask-free forms give
the same attention exactly and are timed here against it, with the plain timm model and the
merged model without proportional attention as bounds:

- ``key_channel``: q' = [q, 1], k' = [k, log(s)/scale]: then scale·q'·k' = scale·q·k + log s.
- ``value_channel``: v' = [s·v, s]; the output's first channels divided by its last one is
  Σ s_j e_ij v_j / Σ s_j e_ij, the same weighted mean.

Both pad q, k, v from 64 to 72 channels (one pad of the qkv projection) so the fused kernels
still apply. A third, ``flex_score_mod``, adds log(size) in FlexAttention's score_mod: a kernel
generated under torch.compile (eager, FlexAttention runs unfused, so only its compiled time
counts). It is exact (float32 output and input gradient within 1e-7 of the mask on an H200),
but compiling the whole merged model with it fails in torch 2.11's inductor ("convert
FlexibleLayout to FixedLayout first", a known bug with score_mod buffers computed in the graph),
so the library keeps the SDPA mask. Each is timed eager, as a CUDA-graph replay and compiled. On CPU, ``--check``
prints each form's largest difference from the masked one (float32). Both write JSON with --out.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

import mergemix.tome as tome
from bench_common import as_graph, at_least, device, median_ms, output_file, save_json
from merge_profile import compile_and_time

MASKED = tome._attention
PAD = 8  # head_dim 64 -> 72, a size the fused kernels accept


def _padded_qkv(attn, x: Tensor) -> Tensor:
    """(B, N, 3, heads, head_dim + PAD): the qkv projection with PAD zero channels."""
    B, N, _ = x.shape
    return F.pad(attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim), (0, PAD))


def _channel_attention(fold):
    """An eval-only ``tome._attention`` that folds the log-size mask into q/k/v with ``fold``."""
    def attention(attn, x, bias, score, need_output=True):
        if score is not None or bias is None:
            return MASKED(attn, x, bias, score, need_output)
        B, N, _ = x.shape
        qkv = _padded_qkv(attn, x)
        log_size = bias[:, 0, 0, :, None]  # (B, N, 1), 0 for prefix tokens
        out = fold(qkv, log_size, attn)
        out = attn.proj(attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim)))
        return out, None, qkv[:, :, 1, :, :attn.head_dim].transpose(1, 2)
    return attention


def _key_channel(qkv: Tensor, log_size: Tensor, attn) -> Tensor:
    d = attn.head_dim
    qkv[:, :, 0, :, d] = 1.0
    qkv[:, :, 1, :, d] = (log_size / attn.scale).to(qkv.dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)[..., :d]


def _value_channel(qkv: Tensor, log_size: Tensor, attn) -> Tensor:
    d = attn.head_dim
    size = log_size.exp().to(qkv.dtype)
    qkv[:, :, 2, :, :d] *= size[..., None]
    qkv[:, :, 2, :, d] = size
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return out[..., :d] / out[..., d:d + 1]


def _flex_attention(attn, x, bias, score, need_output=True):
    """An eval-only ``tome._attention`` adding log(size) to the scores in FlexAttention."""
    if score is not None or bias is None:
        return MASKED(attn, x, bias, score, need_output)
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    log_size = bias[:, 0, 0, :].to(q.dtype)  # (B, N), 0 for prefix tokens

    def add_log_size(scores, b, h, q_idx, kv_idx):
        return scores + log_size[b, kv_idx]

    out = flex_attention(q, k, v, score_mod=add_log_size, scale=attn.scale)
    return attn.proj(attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))), None, k


VARIANTS = {"mask": MASKED, "key_channel": _channel_attention(_key_channel),
            "value_channel": _channel_attention(_value_channel), "flex_score_mod": _flex_attention}


def max_differences(model: torch.nn.Module, x: Tensor) -> dict[str, float]:
    """Largest |logit difference| of each variant from the masked form, on a patched model."""
    out = {}
    with torch.no_grad():
        reference = model(x).float()
        for name, fn in VARIANTS.items():
            tome._attention = fn
            try:
                out[name] = (model(x).float() - reference).abs().max().item()
            finally:
                tome._attention = MASKED
    return out


def flex_gradient_difference(attn: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Largest |difference| of the compiled FlexAttention path from SDPA's mask, output and input
    gradient, float32 (FlexAttention has no CPU backward, so this runs on the GPU only)."""
    torch.manual_seed(0)
    x = torch.randn(8, 150, attn.qkv.in_features, device=device)
    bias = torch.randint(1, 5, (8, 150), device=device).float().log()[:, None, None, :]
    results = []
    for run in (lambda t: MASKED(attn, t, bias, None)[0],
                torch.compile(lambda t: _flex_attention(attn, t, bias, None)[0])):
        xi = x.clone().requires_grad_()
        out = run(xi)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad))
    (out_m, grad_m), (out_f, grad_f) = results
    return {"output": (out_m - out_f).abs().max().item(), "input_grad": (grad_m - grad_f).abs().max().item(),
            "input_grad_scale": grad_m.abs().max().item()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--check", action="store_true", help="only the exactness check (tiny model, CPU)")
    p.add_argument("--forms", nargs="+", default=None, choices=("plain", "no_prop_attn", *VARIANTS), metavar="FORM",
                   help=f"subset of: plain no_prop_attn {' '.join(VARIANTS)} (default: all)")
    p.add_argument("--reps", type=at_least(1), default=20)
    p.add_argument("--out", type=output_file, default=None)
    args = p.parse_args(argv)
    if not args.check and args.device.type != "cuda":  # before minutes of building and timing
        p.error("timing needs a CUDA device (--device cuda); on the CPU run --check")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    if args.check:
        net = tome.patch_tome(timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8), merge_num=30)
        diffs = max_differences(net.eval(), torch.randn(3, 3, 64, 64))
        print(diffs)
        save_json(diffs, args.out)
        return 0
    torch.backends.cudnn.benchmark = True
    base = timm.create_model("deit_small_patch16_224").to(device).eval()
    nets = {"plain": base, "no_prop_attn": tome.patch_tome(copy.deepcopy(base), merge_num=98, prop_attn=False)}
    nets.update({k: tome.patch_tome(copy.deepcopy(base), merge_num=98) for k in VARIANTS})
    nets = {k: net for k, net in nets.items() if args.forms is None or k in args.forms}
    x = torch.randn(256, 3, 224, 224, device=device)
    report: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "batch": 256,
                    "merge_num": 98}
    if args.forms is None or "flex_score_mod" in args.forms:
        report["flex_fp32_max_diff_from_mask"] = flex_gradient_difference(base.blocks[3].attn, device)
        print("flex vs mask, float32:", report["flex_fp32_max_diff_from_mask"], flush=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        report["bf16_max_diff_from_mask"] = max_differences(tome.patch_tome(copy.deepcopy(base), merge_num=98), x)
        for name, net in nets.items():
            tome._attention = VARIANTS.get(name, MASKED)
            call = lambda net=net: net(x)  # noqa: E731
            report[name] = {"eager_ms": median_ms({name: call}, device, args.reps)[name]}
            try:
                report[name]["cuda_graph_ms"] = median_ms({name: as_graph(call)}, device, args.reps)[name]
            except RuntimeError as e:  # eager FlexAttention may not be capturable
                print(f"{name}: no CUDA graph: {str(e).splitlines()[0]}", flush=True)
            torch._dynamo.reset()  # each form traces its own attention function
            try:
                compiled = compile_and_time(net, x, device, args.reps)
                report[name].update(compile_s=compiled["compile_and_first_call_s"], compiled_ms=compiled["ms"])
            except Exception as e:  # noqa: BLE001 - e.g. a FlexAttention lowering this torch lacks
                print(f"{name}: compile failed: {str(e).splitlines()[0]}", flush=True)
            print(name, {k: round(v, 2) for k, v in report[name].items()}, flush=True)
            save_json(report, args.out)  # after each form, so a later failure keeps the earlier ones
        tome._attention = MASKED
    return 0


if __name__ == "__main__":
    sys.exit(main())
