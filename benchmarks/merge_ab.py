"""A/B of the merge op: ``mergemix.merge.merge_tokens`` now against the same file at a git commit.

    python benchmarks/merge_ab.py --ref 7cddc69                        # CPU, DeiT-S's first merge
    python benchmarks/merge_ab.py --ref 7cddc69 --device cuda --dtype bfloat16 --batch-size 256
    python benchmarks/merge_ab.py --ref 7cddc69 --model deit_small_patch16_224 --model-batch-size 32

Both versions run in one process on one matching, interleaved, forward without grad and forward +
backward; the outputs and gradients are compared, so a speed-up that changed the result shows.
With --model, also a whole ToMe-merged forward (eval, no grad) and training forward + backward of
that timm model (eager, 224 px, --merge-num), once with each version of the merge swapped in.
Prints a table; writes JSON with --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from bench_common import at_least, device, merged_copy, model_name, one_line_errors, output_file, seconds
from mergemix import merge as merge_now
from mergemix import tome
from mergemix.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True,
                   help="the baseline: a git commit (its src/mergemix/merge.py), or a merge.py file (where the "
                        "tree has no git history, e.g. a copy made with git show COMMIT:src/mergemix/merge.py)")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--tokens", type=at_least(3), default=197, help="tokens entering the merge, CLS included")
    p.add_argument("--channels", type=at_least(1), default=384)
    p.add_argument("--r", type=at_least(0), default=12, help="tokens merged away, at most half the patch tokens")
    p.add_argument("--reps", type=at_least(1), default=30)
    p.add_argument("--model", type=model_name, default=None, help="also time a whole merged forward of this timm model")
    p.add_argument("--model-batch-size", type=at_least(1), default=32)
    p.add_argument("--model-reps", type=at_least(1), default=10)
    p.add_argument("--merge-num", type=at_least(0), default=98)
    p.add_argument("--out", type=output_file, default=None)
    args = p.parse_args(argv)
    if args.r > (args.tokens - 1) // 2:  # the matching pairs the patch tokens' two alternating halves
        p.error(f"--r {args.r} is more than half of the {args.tokens - 1} patch tokens of --tokens {args.tokens}")
    return args


def load_ref(ref: str) -> ModuleType:
    """The module src/mergemix/merge.py as it was at commit ``ref``, or the file ``ref``."""
    path = Path(ref)
    if not path.is_file():
        try:
            shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/mergemix/merge.py"],
                                   capture_output=True, text=True)
            why = (shown.stderr.strip() or "git show failed").splitlines()[-1] if shown.returncode else ""
        except FileNotFoundError:
            why = "git is not installed"
        if why:
            raise ConfigError(f"--ref {ref} is neither a file nor a commit git can show ({why})")
        text = shown.stdout
        path = Path(tempfile.mkdtemp()) / "merge_ref.py"
        path.write_text(text)
    spec = importlib.util.spec_from_file_location("merge_ref", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # whatever the file raises on import, it is not a usable baseline
        raise ConfigError(f"--ref {ref}: importing it failed ({type(e).__name__}: {e})") from None
    if not callable(getattr(module, "merge_tokens", None)):
        raise ConfigError(f"--ref {ref} has no merge_tokens function: give a version of src/mergemix/merge.py")
    return module


def model_cases(args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> list[tuple[str, Callable[[ModuleType], torch.Tensor]]]:
    """(label, fn(merge module)) for a merged forward and training pass of ``args.model`` with that
    module's ``merge_tokens`` swapped into ``mergemix.tome``; fn returns the logits or a gradient."""
    import timm

    torch.manual_seed(0)
    model = merged_copy(timm.create_model(args.model), merge_num=args.merge_num).to(device)
    x = torch.randn(args.model_batch_size, 3, 224, 224, device=device)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def with_merge(mod, train: bool) -> torch.Tensor:
        saved, tome.merge_tokens = tome.merge_tokens, mod.merge_tokens
        try:
            model.train(train)
            model.zero_grad(set_to_none=True)
            with amp, torch.set_grad_enabled(train):
                logits = model(x)
            if not train:
                return logits
            logits.float().square().mean().backward()
            return model.patch_embed.proj.weight.grad
        finally:
            tome.merge_tokens = saved

    return [(f"{args.model} forward (eval)", lambda mod: with_merge(mod, False)),
            (f"{args.model} forward+backward", lambda mod: with_merge(mod, True))]


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    B, T, C = args.batch_size, args.tokens, args.channels
    x = torch.randn(B, T, C, generator=g).to(device, dtype)
    grad_out = torch.randn(B, T - args.r, C, generator=g).to(device, dtype)
    size = torch.randint(1, 4, (B, T), generator=g).float().to(device)
    m = merge_now.bipartite_matching(torch.randn(B, T - 1, 64, generator=g).to(device), args.r, num_prefix=1)
    versions = {"ref": load_ref(args.ref), "now": merge_now}

    def forward(mod):
        with torch.no_grad():
            return mod.merge_tokens(x, size, m)[0]

    def forward_backward(mod):
        xg = x.detach().requires_grad_()
        mod.merge_tokens(xg, size, m)[0].backward(grad_out)
        return xg.grad

    cases = [("forward", forward, args.reps), ("forward+backward", forward_backward, args.reps)]
    if args.model:  # built before any timing, so that a model that does not fit fails at once
        cases += [(label, fn, args.model_reps) for label, fn in model_cases(args, device, dtype)]
    results = {}
    for label, fn, reps in cases:
        outs = {k: fn(mod) for k, mod in versions.items()}  # warm-up, and the outputs to compare
        times = {k: [] for k in versions}
        for _ in range(reps):
            for k, mod in versions.items():
                times[k].append(seconds(lambda: fn(mod), device))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        diff = (outs["now"].float() - outs["ref"].float()).abs().max().item()
        results[label] = {"ref_ms": round(med["ref"], 4), "now_ms": round(med["now"], 4),
                          "speedup": round(med["ref"] / med["now"], 3), "max_abs_diff": diff}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": device_name, "torch": torch.__version__, "ref": args.ref,
              "settings": {k: str(v) if k == "device" else v for k, v in vars(args).items() if k not in ("out", "ref")},
              "results": results}
    print(f"merge_tokens, {device_name}, {args.dtype}, (B, T, C) = ({B}, {T}, {C}), r = {args.r}; median of "
          f"{args.reps} interleaved calls" + (f" ({args.model_reps} for the model at batch {args.model_batch_size}, "
                                             f"merge_num {args.merge_num})" if args.model else ""))
    print(f"| pass | at {args.ref} (ms) | now (ms) | speed-up | max |Δ| |")
    print("|---|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['ref_ms']:.3f} | {r['now_ms']:.3f} | {r['speedup']:.2f}× | {r['max_abs_diff']:.2g} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
