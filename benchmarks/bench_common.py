"""What the benchmark scripts share: checks of their command line, output helpers, provenance
(device, host, versions, commit) and a timer.

A benchmark may time for minutes before it writes anything, so a bad value must fail while the
flags are parsed, not after the timing: the argument types below check devices, model names,
counts and output files up front (argparse then prints its usage line and exits 2). Checks that
need the built model raise ``ConfigError``; ``one_line_errors`` turns those into one ``error: ...``
line and exit code 2, as ``mergemix`` itself does.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
import torchmetrics
from torch import nn

import mergemix
from mergemix.cli import one_line
from mergemix.distributed import resolve_device
from mergemix.errors import ConfigError, MergeMixError
from mergemix.models import check_name
from mergemix.tome import patch_tome


def at_least(minimum: int) -> Callable[[str], int]:
    """Argument type: an int of at least ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError is reported by argparse as "invalid int value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file, or None if it can; creates its folder. Probed by
    opening it for appending (and removing it again if it was not there)."""
    if path.is_dir():
        return f"{path} is a folder; give a file, e.g. {path / 'result.json'}"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file; give a folder"
            break
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as e:
        return f"cannot write {path}: {e.strerror or e}"
    if not existed:
        path.unlink()
    return None


def output_file(text: str) -> Path:
    """Argument type: a file the script can write (``unwritable``), so that a bad path fails
    before the timing, not after it."""
    why = unwritable(Path(text))
    if why:
        raise argparse.ArgumentTypeError(why)
    return Path(text)


def output_folder(text: str) -> Path:
    """Argument type: a folder files can be written to, created now."""
    why = unwritable(Path(text) / ".probe")
    if why:
        raise argparse.ArgumentTypeError(why)
    return Path(text)


def check_outputs(paths: Sequence[Path], what: str) -> None:
    """``ConfigError`` for the first of ``paths`` that cannot be written (``what`` names the flag
    that chose them): for output files derived from several flags, checked before the work."""
    for path in paths:
        why = unwritable(path)
        if why:
            raise ConfigError(f"{what}: {why}")


def save_json(report: dict, out: Path | None) -> None:
    """Write ``report`` to ``out`` (if given). Scripts call it after each stage, so that a later
    failure or timeout keeps what was measured."""
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")


def save_figure(fig: Any, path: Path) -> None:
    """Write a figure as the results' PNGs are written, and free it."""
    import matplotlib.pyplot as plt  # the scripts that draw have chosen their backend by now

    fig.savefig(path, dpi=120)
    plt.close(fig)


def host_cpu() -> str:
    """The host's CPU model and core count: eager GPU steps of a merged model launch many small
    kernels, so the host CPU sets their pace and the same GPU gives different eager ratios."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def git_commit(root: Path = Path(__file__).resolve().parents[1]) -> str | None:
    """The checkout's HEAD commit, with "-dirty" when tracked files differ from it; None outside git.

    Changed files under benchmarks/results/ do not count: they are what a benchmark writes, not what
    it runs, and a table finished before the next benchmark starts would otherwise mark that one dirty.
    """
    status = ["status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"]
    try:
        head, changes = (subprocess.run(["git", "--no-optional-locks", *cmd], cwd=root, capture_output=True, text=True,
                                        check=True).stdout.strip()
                         for cmd in (["rev-parse", "HEAD"], status))
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if changes else "")


def provenance(device: torch.device, threads: int) -> dict:
    """What a result was measured on and with: the device (a CPU with its ``threads``), the host
    CPU, the library versions and the git commit."""
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type} ({platform.processor() or platform.machine()}, {threads} threads)")
    return {"device": name, "host": host_cpu(),
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "torchmetrics": torchmetrics.__version__,
                         "mergemix": mergemix.__version__, "python": platform.python_version()},
            "commit": git_commit()}


def merged_copy(net: nn.Module, **options: Any) -> nn.Module:
    """``patch_tome`` on a copy of ``net``; its ValueError (a merge_num too large for the model, a
    read-out block out of range, not a ViT) is an input error, raised before any timing."""
    try:
        return patch_tome(copy.deepcopy(net), **options)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def paired(diffs: list[float]) -> dict:
    """Mean and standard error (stdev / √n; None for one) of differences paired by seed."""
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return {"mean": statistics.mean(diffs), "se": se, "diffs": diffs}


def plus_minus(mean: float, spread: float | None, digits: int, sign: str = "") -> str:
    """``mean ± spread`` to ``digits`` decimals; ``± –`` where one seed gives no spread."""
    return f"{mean:{sign}.{digits}f} ± " + ("–" if spread is None else f"{spread:.{digits}f}")


def device(text: str) -> torch.device:
    """Argument type: a torch device that is present (``auto``: CUDA if there is one, else CPU)."""
    try:
        return resolve_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def model_name(text: str) -> str:
    """Argument type: a model name timm knows."""
    try:
        return check_name(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def profile_parser(doc: str | None, reps: int) -> argparse.ArgumentParser:
    """The flags merge_profile.py and train_profile.py share (device, model, batch, merge_num, repetitions,
    compile, output), DeiT-S at batch 256 and 98 merged tokens by default; each script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--model", type=model_name, default="deit_small_patch16_224")
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--merge-num", type=at_least(0), default=98)
    p.add_argument("--reps", type=at_least(1), default=reps)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", type=output_file, default=None)
    return p


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one ``fn()``, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_ms(fns: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict[str, float]:
    """Median ms per call of each fn, calls interleaved round-robin after one warm-up each (so that a
    slow spell of the machine falls on all of them alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(seconds(fn, device) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def one_line_errors(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's ``main(argv)``: an input error (``MergeMixError``) prints one line and
    returns its exit code; anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except MergeMixError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return e.exit_code
    return wrapper


def as_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn`` once as a CUDA graph; the replay is its GPU time without launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
