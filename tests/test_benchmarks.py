"""The step-time benchmark runs end to end on a tiny ViT and reports consistent ratios."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmark_scripts import ROOT, load


def test_step_time_ratios(tmp_path):
    step_time = load("step_time")
    out = tmp_path / "st.json"
    tiny = ["--model-kwargs", "patch_size=8", "depth=2", "embed_dim=32", "num_heads=2", "--img-size", "32",
            "--batch-size", "4", "--warmup", "1", "--steps", "2", "--num-classes", "10"]
    assert step_time.main([*tiny, "--methods", "mixup", "mergemix", "--mergemix-configs", "clean,merge", "none,merge",
                           "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    configs = result["configs"]
    assert set(configs) == {"cutmix", "mixup", "mergemix[clean,merge]", "mergemix[none,merge]"}  # cutmix always added
    assert configs["cutmix"]["ratio_to_cutmix"] == 1.0
    for r in configs.values():
        assert r["ratio_to_cutmix"] == pytest.approx(r["median_step_ms"] / configs["cutmix"]["median_step_ms"])
        # every timed step is kept (the spread between steps), and the median is theirs
        assert len(r["step_ms"]) == 2 and r["median_step_ms"] == pytest.approx(sum(r["step_ms"]) / 2, abs=0.01)
    assert result["host"].endswith(" cores") and len(result["host"]) > len(" cores")
    assert math.isfinite(result["mask_work"]["share_of_mergemix_step"])  # timings: structure only, no bounds
    assert result["mask_work"]["measured_on"] == "mergemix[clean,merge]"  # the default aux mode, when it ran
    ev = result["eval_throughput"]
    assert ev["merged_speedup"] == pytest.approx(ev["merged_images_per_s"] / ev["plain_images_per_s"])
    table = out.with_suffix(".md").read_text()
    assert table.startswith("Device: cpu")
    for name, r in configs.items():  # the published table shows the JSON's figures
        assert f"| {name} |" in table and f"| {r['ratio_to_cutmix']:.2f} |" in table
        ops = r["kernel_ops_fwd_bwd"] / configs["cutmix"]["kernel_ops_fwd_bwd"]
        assert f"| {r['kernel_ops_fwd_bwd']} ({ops:.2f}) |" in table
    # the clean pass runs a second forward and backward: more kernels than one pass on mixed images
    assert configs["mergemix[clean,merge]"]["kernel_ops_fwd_bwd"] > configs["mergemix[none,merge]"]["kernel_ops_fwd_bwd"] \
        > configs["mixup"]["kernel_ops_fwd_bwd"]
    # without MergeMix there is no mask work to measure, and the rest still runs
    assert step_time.main([*tiny, "--methods", "mixup", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["configs"]) == {"cutmix", "mixup"}
    # MergeMix `none` alone, merging in every block and in every 2nd, side by side: the mask work
    # is a share of the first one's step
    assert step_time.main([*tiny, "--methods", "mergemix", "--mergemix-configs", "none,merge",
                           "--merge-every", "1", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["configs"]) == {"cutmix", "mergemix[none,merge]", "mergemix[none,merge,every2]"}
    mw = result["mask_work"]
    assert mw["measured_on"] == "mergemix[none,merge]"
    assert mw["share_of_mergemix_step"] == pytest.approx(mw["ms"] / result["configs"]["mergemix[none,merge]"]["median_step_ms"])
    ev = result["eval_throughput"]
    assert ev["merged_every2_speedup"] == pytest.approx(ev["merged_every2_images_per_s"] / ev["plain_images_per_s"])
    table = out.with_suffix(".md").read_text()
    assert "% of a mergemix[none,merge] step." in table
    assert f"merged every2 {ev['merged_every2_images_per_s']:.0f} img/s ({ev['merged_every2_speedup']:.2f}×)" in table


def test_kernel_op_counter_counts_what_computes_and_not_views_or_allocations():
    """Hand-counted: (a + b).relu() computes twice; the reshapes and transpose of a contiguous result
    and an empty tensor do not, and a reshape that must copy (of the transpose) does.
    A backward counts too: through v @ w, one matmul per input that needs a gradient; the second
    time also the two additions into the .grad the first left."""
    step_time = load("step_time")
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert step_time.count_kernel_ops(lambda: (a + b).relu().reshape(-1).view(4, 3).t()) == 2
    assert step_time.count_kernel_ops(lambda: a.t().reshape(-1)) == 1
    assert step_time.count_kernel_ops(lambda: torch.empty(5)) == 0
    v, w, grad = torch.randn(3, 4, requires_grad=True), torch.randn(4, 2, requires_grad=True), torch.ones(3, 2)
    counts = []
    for _ in range(2):
        out = v @ w  # the forward outside the count
        counts.append(step_time.count_kernel_ops(lambda: out.backward(grad)))
    assert counts == [2, 4]


def test_step_time_tag_names_the_default_file(tmp_path, monkeypatch):
    """--tag keeps a second run (say with warm compile caches) from overwriting the first's file."""
    step_time = load("step_time")
    monkeypatch.setattr(step_time, "RESULTS", tmp_path)
    tiny = ["--model-kwargs", "patch_size=8", "depth=2", "embed_dim=32", "num_heads=2", "--img-size", "32",
            "--batch-size", "4", "--warmup", "1", "--steps", "1", "--num-classes", "10", "--methods", "cutmix"]
    assert step_time.main([*tiny, "--prop-attn", "off", "--tag", "cache-warm"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_time_cpu_noprop_cache-warm.json",
                                                          "step_time_cpu_noprop_cache-warm.md"]
    for bad in ("../x", "a b", ""):
        with pytest.raises(SystemExit):
            step_time.parse_args(["--tag", bad])


def step_settings(**changes) -> dict:
    """A step_time result's settings: a small CPU run, with ``changes``."""
    return {"model": "m", "model_kwargs": {}, "img_size": 32, "num_patches": 16, "batch_size": 4, "amp": None,
            "compile": False, "merge_num": 8, "steps": 3, **changes}


DEIT_S_GPU = {"img_size": 224, "num_patches": 196, "batch_size": 256, "amp": "bfloat16", "compile": True,
              "merge_num": 98, "steps": 10}


def test_step_time_times_merging_without_proportional_attention_side_by_side(monkeypatch):
    """--prop-attn on off: each MergeMix configuration and the merged evaluation with ToMe's
    log-size attention bias and without it, the latter labelled 'noprop' and really run without it."""
    import argparse
    import contextlib

    import timm

    step_time = load("step_time")
    args = step_time.parse_args(["--merge-every", "1", "2", "--prop-attn", "on", "off", "--num-classes", "3"])
    assert args.prop_attn == [True, False]
    configs = step_time.configurations(["cutmix", "mergemix"], 4, ["none,merge"], args.merge_every, args.prop_attn)
    assert [label for label, _, _ in configs] == ["cutmix", "mergemix[none,merge]", "mergemix[none,merge,noprop]",
                                                  "mergemix[none,merge,every2]", "mergemix[none,merge,every2,noprop]"]
    assert [opts.get("prop_attn") for _, _, opts in configs] == [None, True, False, True, False]
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=3)
    runner = step_time.Runner(*configs[2], base, args, torch.device("cpu"))
    assert runner.model.tome.prop_attn is False
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    assert torch.isfinite(torch.tensor(runner.step(x, y, contextlib.nullcontext, torch.device("cpu"))))
    # the merged evaluation names its nets the same way, and the one it times without the bias (the
    # nets taken from the forwards it times, in the order built) computes other logits
    args.steps = 1
    timed = []
    monkeypatch.setattr(step_time, "seconds", lambda fn, device: timed.append(fn.__defaults__[0]) or 0.5)
    ev = step_time.eval_throughput(base, x, 4, argparse.Namespace(**{**vars(args), "merge_every": [1]}),
                                   torch.device("cpu"), contextlib.nullcontext)
    assert {"merged_speedup", "merged_noprop_speedup"} <= set(ev)
    plain, prop, noprop = {id(net): net for net in timed}.values()
    assert not hasattr(plain, "tome") and (prop.tome.prop_attn, noprop.tome.prop_attn) == (True, False)
    assert prop.tome.r == noprop.tome.r and sum(prop.tome.r) == 4  # the same merging, bias aside
    with torch.no_grad():
        assert (prop(x) - noprop(x)).abs().max() > 1e-4
    # the run's file and table say which it timed
    assert step_time.parse_args(["--prop-attn", "off"]).prop_attn == [False]
    settings = step_settings(merge_num=4, steps=1, prop_attn=[True, False])
    row = {"passes": "p", "median_step_ms": 1.0, "ratio_to_cutmix": 1.0, "peak_memory_mb": None, "warmup_s": 1.0}
    table = step_time.markdown({"device": "cpu", "settings": settings, "configs": {"cutmix": row}})
    assert "proportional attention on and off (noprop)" in table


def test_step_time_table_omits_peak_memory_under_cuda_graph_replay():
    step_time = load("step_time")
    settings = step_settings(**DEIT_S_GPU, compile_mode=None)
    row = {"passes": "1 fwd + 1 bwd", "median_step_ms": 30.0, "ratio_to_cutmix": 1.0, "peak_memory_mb": 8988.0,
           "warmup_s": 24.0}
    result = {"device": "gpu", "settings": settings, "configs": {"cutmix": row}}
    assert "| cutmix | 1 fwd + 1 bwd | 30.0 | 1.00 | 8988 | 24.0 |" in step_time.markdown(result)
    # a peak shown comes with what it includes: every configuration's resident state
    assert "compare it within this table, not across files" in step_time.markdown(result)
    settings["compile_mode"] = "reduce-overhead"
    assert "| cutmix | 1 fwd + 1 bwd | 30.0 | 1.00 | – | 24.0 |" in step_time.markdown(result)
    assert "compare it within this table" not in step_time.markdown(result)
    # compile seconds within one run are flagged as not comparable once MergeMix configurations can share graphs
    note = "compare compile times between processes"
    result["configs"]["mergemix[none,merge]"] = row
    assert note not in step_time.markdown(result)
    result["configs"]["mergemix[none,merge,every2]"] = row
    assert note in step_time.markdown(result)
    # eager runs show their warm-up too (a first step builds cuDNN's plans), not as a compile
    settings.update(compile=False, compile_mode=None)
    assert "| peak memory (MB) | warm-up (s) |" in step_time.markdown(result)


def test_step_time_block_scope_matches_eager_and_does_not_grow_with_depth(monkeypatch):
    """--compile-scope blocks ('aot_eager' traces forward and backward as inductor would, without
    compiling kernels; 'eager' only captures): logits, read-out and gradients equal the eager
    merged model's, and the number of graphs is set by the flag combinations (first merge,
    read-out block, after it), not by the depth."""
    import timm

    from mergemix import tome
    step_time = load("step_time")
    graphs = {}
    for depth, backend in ((6, "aot_eager"), (12, "eager")):
        monkeypatch.setattr(tome, "_run_block", tome._run_block)  # undone after the test
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth, embed_dim=32,
                                  num_heads=2, num_classes=5)
        tome.patch_tome(model, merge_num=4 * depth, readout_block=2)
        x = torch.randn(3, 3, 32, 32)
        ref = model(x)
        ref_readout = model.tome_readout
        ref.square().sum().backward()
        ref_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        assert step_time.compile_model(model, "blocks", backend=backend) is model
        out = model(x)
        out.square().sum().backward()
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(model.tome_readout.attn, ref_readout.attn, atol=1e-6)
        assert torch.equal(model.tome_readout.index, ref_readout.index)
        for p, g in zip(model.parameters(), ref_grads):
            assert torch.allclose(p.grad, g, atol=1e-5)
        graphs[depth] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs[6] == graphs[12] < 6  # fewer graphs than blocks, and the same at twice the depth
    torch._dynamo.reset()


def test_sdpa_bias_forms_equal_explicit_softmax():
    """Padding keys to a multiple of 8 with -inf bias leaves the attention unchanged."""
    sdpa_bias = load("sdpa_bias")
    assert all(d < 1e-5 for d in sdpa_bias.check().values())
    q, k, v, bias = sdpa_bias.inputs(2, 3, 13, 8, torch.device("cpu"), torch.float32)
    _, k8, v8, bias8 = sdpa_bias.padded(q, k, v, bias)
    assert k8.shape[2] == v8.shape[2] == bias8.shape[-1] == 16 and torch.isinf(bias8[..., 13:]).all()
    assert sdpa_bias.TOKENS[:3] == [197, 185, 173] and sdpa_bias.TOKENS[-1] == 103 and len(sdpa_bias.TOKENS) == 12


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager is the point here
def test_prop_attn_variants_match_the_mask():
    """The mask-free forms of proportional attention give the masked form's logits (float32)."""
    import timm
    from mergemix.tome import patch_tome
    variants = load("prop_attn_variants")
    torch.manual_seed(0)
    net = patch_tome(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3), merge_num=6).eval()
    x = torch.randn(2, 3, 32, 32)
    diffs = variants.max_differences(net, x)
    assert set(diffs) == {"mask", "key_channel", "value_channel", "flex_score_mod"}
    assert max(diffs.values()) < 1e-5
    # the check has teeth: without proportional attention the logits move
    with torch.no_grad():
        plain = net(x)
        net.tome.prop_attn = False
        assert (net(x) - plain).abs().max() > 1e-3


def test_accuracy_keeps_rows_of_an_earlier_table_with_the_same_recipe(tmp_path):
    accuracy = load("accuracy")
    path = tmp_path / "fashion-mnist_gpu.json"
    recipe = ["--epochs", "10"]
    path.write_text(json.dumps({"recipe": recipe, "table": {"none": {"top1": 85.0}, "mergemix": {"top1": 1.0}},
                                "runs": {"none": [{"top1": 85.0}], "mergemix": [{"top1": 1.0}]}}))
    new_table, new_raw = {"mergemix": {"top1": 86.0}}, {"mergemix": [{"top1": 86.0}]}
    table, raw = accuracy.merge_previous(path, recipe, new_table, new_raw)
    assert table == {"none": {"top1": 85.0}, "mergemix": {"top1": 86.0}}  # old row kept, redone row replaced
    assert raw == {"none": [{"top1": 85.0}], "mergemix": [{"top1": 86.0}]}
    # another recipe: the earlier table does not mix into this one
    assert accuracy.merge_previous(path, ["--epochs", "60"], new_table, new_raw) == (new_table, new_raw)
    assert accuracy.merge_previous(tmp_path / "missing.json", recipe, new_table, new_raw) == (new_table, new_raw)
    # each row keeps the number of runs that shared the machine with it: its own, or an older table's one count
    path.write_text(json.dumps({"recipe": recipe, "jobs": 3, "table": {"none": {"top1": 85.0}, "cutmix": {"top1": 80.0, "jobs": 1},
                                                                      "mergemix": {"top1": 1.0}},
                                "runs": {"none": [], "cutmix": [], "mergemix": []}}))
    table, _ = accuracy.merge_previous(path, recipe, {"mergemix": {"top1": 86.0, "jobs": 2}}, new_raw)
    assert {label: row["jobs"] for label, row in table.items()} == {"none": 3, "cutmix": 1, "mergemix": 2}


def _runs(seeds, top1, ece, nll, brier, epoch_time):
    """One fake run per seed, as run_one returns them."""
    return [{"seed": s, "top1": t, "ece": e, "nll": nll, "brier": brier, "epoch_time": et}
            for s, t, e, et in zip(seeds, top1, ece, epoch_time)]


def test_accuracy_sets_every_row_against_mergemix_paired_by_seed():
    accuracy = load("accuracy")

    raw = {"mergemix": _runs([0, 1, 2], [70.0, 72.0, 71.0], [0.10, 0.12, 0.11], 1.0, 0.5, [1.0] * 3),
           # listed out of seed order, and with a seed MergeMix did not run
           "none": _runs([2, 0, 1, 7], [72.0, 71.0, 72.0, 99.0], [0.05, 0.06, 0.07, 0.0], 1.0, 0.5, [1.0] * 4),
           "cutmix": _runs([1], [69.0], [0.20], 1.0, 0.5, [1.0]),
           "mixup": _runs([5], [60.0], [0.3], 1.0, 0.5, [1.0])}  # no seed in common: no row
    diffs = accuracy.paired_differences(raw, "mergemix")
    assert set(diffs) == {"none", "cutmix"}
    none = diffs["none"]["top1"]
    # by hand: differences +1, 0, +1 (seeds 0, 1, 2); mean 2/3; stdev √(1/3); SE √(1/3)/√3 = 1/3
    assert none["diffs"] == [1.0, 0.0, 1.0]
    assert none["mean"] == pytest.approx(2 / 3) and none["se"] == pytest.approx(1 / 3)
    assert diffs["none"]["ece"]["mean"] == pytest.approx(-0.05)  # -0.04, -0.05, -0.06
    assert diffs["cutmix"]["top1"] == {"mean": -3.0, "se": None, "diffs": [-3.0]}  # one seed: no spread
    assert accuracy.paired_differences(raw, "smmix") == {}  # a table without the reference has no paired rows
    table = {label: accuracy.aggregate(runs) for label, runs in raw.items()}
    text = accuracy.markdown("digits", "quick", table, raw, ["--epochs", "8"])
    assert "| none | 3 | +0.67 ± 0.33 | +1.00, +0.00, +1.00 | -0.0500 ± 0.0058 |" in text
    assert "| cutmix | 1 | -3.00 ± – | -3.00 | +0.0800 ± – |" in text
    # one seed: its spread is unknown, not zero
    assert "| cutmix | 1 | 69.00 ± – | 0.2000 ± – |" in text and "| none | 4 | 78.50 ± 13.67 |" in text
    assert "| mixup | 1 |" in text and "| mixup | 1 | -" not in text.split("Paired by seed")[1]
    assert "Rows made on" not in text  # no row says where it was made


def test_accuracy_table_says_which_rows_its_provenance_is_of():
    """A table grown by --methods holds rows made elsewhere, or before rows recorded it: the line saying
    where rows were made must name its rows unless it holds for all of them."""
    accuracy = load("accuracy")
    run = {"seed": 0, "top1": 70.0, "ece": 0.1, "nll": 1.0, "brier": 0.5, "epoch_time": 1.0}
    raw = {"none": [run], "cutmix": [run], "mergemix": [run]}
    table = {label: accuracy.aggregate(runs) for label, runs in raw.items()}
    place = {"device": "cpu (x86_64, 1 threads)", "host": "a CPU", "commit": "abc",
             "versions": {"torch": "2.4", "timm": "1.0.26", "mergemix": "0.1.0"}}
    table["cutmix"]["provenance"] = place
    text = accuracy.markdown("digits", "quick", table, raw, ["--epochs", "8"])
    assert ("Rows made on cpu (x86_64, 1 threads) on a CPU, torch 2.4, timm 1.0.26, mergemix 0.1.0, commit abc "
            "(cutmix); the others before rows recorded where they were made.") in text
    for row in table.values():
        row["provenance"] = place
    text = accuracy.markdown("digits", "quick", table, raw, ["--epochs", "8"])
    assert "Rows made on cpu (x86_64, 1 threads) on a CPU, torch 2.4, timm 1.0.26, mergemix 0.1.0, commit abc.\n" in text
    table["none"]["provenance"] = {**place, "commit": "def"}  # every row recorded, in two places
    text = accuracy.markdown("digits", "quick", table, raw, ["--epochs", "8"])
    assert ("mergemix 0.1.0, commit def (none); on cpu (x86_64, 1 threads) on a CPU, torch 2.4, timm 1.0.26, "
            "mergemix 0.1.0, commit abc (cutmix, mergemix).\n") in text


def test_accuracy_figure_labels_overlap_neither_each_other_nor_other_points():
    """Ablations land within a fraction of a point of each other: their labels must still be legible."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text
    accuracy = load("accuracy")
    fig, ax = plt.subplots(figsize=(8, 6))
    # a cluster at the top of the plot, where labels cannot all go up
    points = [(0.12 + 0.001 * i, 74.5 - 0.05 * i) for i in range(8)] + [(0.05, 70.0), (0.2, 66.0), (0.3, 60.0)]
    labels = [f"mergemix[option_{i}=value]" for i in range(8)] + ["none", "cutmix", "smmix"]
    ax.plot(*zip(*points), "o")
    texts = accuracy.annotate_apart(ax, points, labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the text alone, without its leader line
    assert [t.get_text() for t in texts] == labels
    assert not [(a, b) for a in range(len(boxes)) for b in range(a) if boxes[a].overlaps(boxes[b])]
    assert all(accuracy.inside(box, ax.bbox) for box in boxes)
    for i, box in enumerate(boxes):
        others = [ax.transData.transform(p) for j, p in enumerate(points) if j != i]
        assert not any(box.contains(x, y) for x, y in others), labels[i]
    # an isolated point keeps its label next to it, without a leader line
    assert texts[-2].xyann == (4, 3) and texts[-2].arrow_patch is None
    assert texts[-1].get_horizontalalignment() == "right"  # at the right edge: to the left of its point
    plt.close(fig)


def test_accuracy_figure_labels_keep_off_the_error_bars():
    """Each of mixup's and none's nearest places (up right) lies on another point's error bar,
    cutmix's vertical one and deit's horizontal one: no label may cross any bar."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text
    accuracy = load("accuracy")
    fig, ax = plt.subplots(figsize=(8, 6))
    points = [(0.5, 50.0), (0.53, 35.0), (0.2, 80.0), (0.15, 81.5)]
    errors = [(0.01, 1.0), (0.01, 30.0), (None, None), (0.1, 0.5)]
    for (x, y), (xerr, yerr) in zip(points, errors):
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=accuracy.CAPSIZE)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    texts = accuracy.annotate_apart(ax, points, ["mixup", "cutmix", "none", "deit"], errors=errors)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for text in texts:
        box = Text.get_window_extent(text, renderer)
        for (x, y), (xerr, yerr) in zip(points, errors):
            (x0, y0), (x1, y1) = ax.transData.transform([(x - (xerr or 0), y - (yerr or 0)), (x + (xerr or 0), y + (yerr or 0))])
            xc, yc = ax.transData.transform((x, y))
            assert not (box.x0 <= xc <= box.x1 and box.y0 <= y1 and y0 <= box.y1), (text.get_text(), "vertical", x)
            assert not (box.y0 <= yc <= box.y1 and box.x0 <= x1 and x0 <= box.x1), (text.get_text(), "horizontal", x)
    assert texts[0].xyann != (4, 3) and texts[2].xyann != (4, 3)  # both moved off their first choice
    plt.close(fig)


def test_accuracy_figure_draws_mergemix_over_its_variants_and_names_its_recipe():
    """MergeMix and a variant at the same point with the same bars: MergeMix's red stays visible.
    The title names the dataset, the mode and the epochs its recipe trains (the last --epochs)."""
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import numpy as np
    accuracy = load("accuracy")
    row = {"top1": 90.0, "top1_std": 1.0, "ece": 0.1, "ece_std": 0.01}
    fig = accuracy.figure("digits", "long", ["--epochs", "8", "--epochs", "100"],
                          {"mergemix": row, "mergemix[aux=none]": row, "none": {**row, "top1": 80.0}})
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255
    assert (np.abs(rgb - matplotlib.colors.to_rgb("tab:red")).max(axis=-1) < 0.02).sum() > 20
    assert fig.axes[0].get_title().startswith("digits, long mode (100 epochs)\n")
    plt.close(fig)


def test_tome_eval_figure_keeps_its_legend_off_the_plots_and_names_the_checkpoint():
    import matplotlib.pyplot as plt
    tome_eval = load("tome_eval")
    plain = {"merge_num": None, "merge_every": None, "prop_attn": None, "tokens_per_block": None, "top1": 70.0,
             "ece": 0.2, "images_per_s": 100.0}
    merged = [{"merge_num": n, "merge_every": k, "prop_attn": True, "tokens_per_block": [17, 17 - n], "top1": 70.0 - n,
               "ece": 0.2 - n / 100, "images_per_s": 100.0 + 10 * n} for k in (1, 2) for n in (4, 8)]
    fig = tome_eval.figure({"model": "vit", "dataset": "digits", "checkpoint": "runs/tokens/fast-s0", "num_tokens": 17,
                            "points": [plain, *merged]})
    fig.canvas.draw()
    (legend,) = fig.legends
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in fig.axes)
    assert [t.get_text() for t in legend.get_texts()] == ["merged in every block", "merged in every 2 blocks", "plain"]
    assert fig.get_suptitle() == "ToMe at inference: vit on digits, checkpoint runs/tokens/fast-s0"
    plt.close(fig)


def test_accuracy_tokens_mode_plans_the_no_merge_ablation_on_the_configs_model():
    accuracy = load("accuracy")
    recipe = accuracy.RECIPES["fashion-mnist"]["tokens"]
    labels = accuracy.plan("tokens", "fashion-mnist", recipe, ["none", "mergemix", "mergemix[merge_num=0]"])
    assert labels["mergemix[merge_num=0]"] == ["--mix", "mergemix", "--merge-num", "0"]
    assert set(labels) == {"none", "mergemix", "mergemix[merge_num=0]"}
    assert "--model-kwargs" not in recipe  # the config's 49-token model, not the full mode's 16-token one


def test_accuracy_long_mode_ablates_mergemix_on_fashion_mnist_only():
    """At 60 epochs MixUp overtook MergeMix on Fashion-MNIST: long mode runs MergeMix's ablations there
    (merging off, the reference's MixUp auxiliary loss), and the 100-epoch digits runs stay baselines."""
    accuracy = load("accuracy")
    fmnist = accuracy.plan("long", "fashion-mnist", accuracy.RECIPES["fashion-mnist"]["long"],
                           ["mixup", "mergemix[merge_num=0]", "mergemix[aux=mixup]"])
    assert fmnist == {"mixup": ["--mix", "mixup"], "mergemix[merge_num=0]": ["--mix", "mergemix", "--merge-num", "0"],
                      "mergemix[aux=mixup]": ["--mix", "mergemix", "--aux-loss", "mixup"]}
    digits = accuracy.plan("long", "digits", accuracy.RECIPES["digits"]["long"], None)
    assert set(digits) == {*accuracy.BASELINES, "mergemix[equal time]"}


def test_accuracy_plans_the_fast_recipe_where_tokens_are_many_and_not_in_full_mode():
    """The README's fast GPU recipe trains as one label with its three flags, and its parts, in the
    many-token modes; full mode (timed to its 2-hour budget) does not grow by them."""
    accuracy = load("accuracy")
    label = "mergemix[aux=none,prop_attn=off,merge_every=2]"
    labels = accuracy.plan("tokens-long", "fashion-mnist", accuracy.RECIPES["fashion-mnist"]["tokens-long"], None)
    assert labels[label] == ["--mix", "mergemix", "--aux-loss", "none", "--mix-opt", "prop_attn=false",
                             "--merge-every", "2"]
    assert labels["mergemix[aux=none,merge_every=2]"] == ["--mix", "mergemix", "--aux-loss", "none", "--merge-every", "2"]
    # its masks with an unmerged training forward: the same flags and --no-merge-train
    assert labels["mergemix[aux=none,prop_attn=off,merge_every=2,merge_train=off]"] == [*labels[label], "--no-merge-train"]
    full = accuracy.plan("full", "digits", accuracy.RECIPES["digits"]["full"], None)
    assert not set(accuracy.FAST_RECIPE) & set(full) and "mergemix[merge_every=2]" in full


def test_accuracy_equal_time_row_counts_the_epochs_the_runs_get(tmp_path):
    """--extra --epochs overrides the recipe's for every run, so the equal-time share is of that count, and
    the row's own --epochs comes last on its command line (before, --extra's came last and won)."""
    accuracy = load("accuracy")
    assert accuracy.plan("full", "digits", ["--epochs", "30", "--epochs", "10"], None)["mergemix[equal time]"][-1] == "6"
    # every table gets the row, not only those with the ablations (Fashion-MNIST's full table has none)
    fmnist = accuracy.plan("full", "fashion-mnist", accuracy.RECIPES["fashion-mnist"]["full"], None)
    assert fmnist["mergemix[equal time]"] == ["--mix", "mergemix", "--epochs", "6"]
    args = accuracy.parse_args(["--mode", "full", "--runs-dir", str(tmp_path), "--extra", "--epochs", "10"])
    recipe = [*accuracy.RECIPES["digits"]["full"], "--epochs", "10"]
    labels = accuracy.plan("full", "digits", recipe, ["mergemix[equal time]"])
    ((cmd, _),) = accuracy.commands(args, "digits", recipe, labels, [0])["mergemix[equal time]"]
    assert cmd[len(cmd) - cmd[::-1].index("--epochs")] == "6"


def test_accuracy_equal_time_share_follows_the_modes_cost_ratio():
    """Where MergeMix costs ~1.2x CutMix per epoch (small-data, tokens, tokens-long), equal time is 0.8 of
    the epochs, not the 0.6 of the ~1.6x tables: 80 of small-data's 100 epochs, 8 of tokens' 10."""
    accuracy = load("accuracy")
    recipes = accuracy.RECIPES["fashion-mnist"]
    assert accuracy.plan("small-data", "fashion-mnist", recipes["small-data"], None)["mergemix[equal time]"][-1] == "80"
    assert accuracy.plan("tokens", "fashion-mnist", recipes["tokens"], None)["mergemix[equal time]"][-1] == "8"
    assert accuracy.plan("long", "fashion-mnist", recipes["long"], None)["mergemix[equal time]"][-1] == "36"


def test_accuracy_tokens196_mode_trains_the_gpu_targets_token_count():
    """tokens196 is tokens-long with 2x2 patches: a model of 196 patch tokens with 98 merged, as in the
    GPU speed targets, and otherwise the same recipe."""
    import timm
    from mergemix.config import parse_train_args
    accuracy = load("accuracy")
    recipe = accuracy.RECIPES["fashion-mnist"]["tokens196"]
    args = parse_train_args(["--dataset", "fashion-mnist", *recipe])
    assert (args.merge_num, args.device, args.epochs, args.train_subset) == (98, "cuda", 20, 5000)
    model = timm.create_model(args.model, pretrained=False, num_classes=10, img_size=28, in_chans=1, **args.model_kwargs)
    assert model.patch_embed.num_patches == 196
    long = parse_train_args(["--dataset", "fashion-mnist", *accuracy.RECIPES["fashion-mnist"]["tokens-long"]])
    assert {**args.model_kwargs, "patch_size": 4} == long.model_kwargs
    assert set(accuracy.FAST_RECIPE) <= set(accuracy.plan("tokens196", "fashion-mnist", recipe, None))


def test_tome_eval_points_follow_mergemix_eval(tmp_path):
    from mergemix import cli
    tome_eval = load("tome_eval")
    tiny = ["--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2", "--epochs", "1",
            "--batch-size", "128", "--warmup-epochs", "0", "--mix", "none"]
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "run", *tiny]) == 0
    assert tome_eval.main(["--checkpoint", str(tmp_path / "run"), "--merge-nums", "0", "6", "10", "--merge-every", "1", "2",
                           "--prop-attn", "on", "off", "--name", "tome", "--results-dir", str(tmp_path / "res")]) == 0
    report = json.loads((tmp_path / "res" / "tome.json").read_text())
    # merge_num 0 is the same model for every K and either attention: evaluated once
    plain, zero, six, ten, six_every2, six_noprop, ten_noprop, six_every2_noprop = report["points"]
    assert [(p["merge_num"], p["merge_every"], p["prop_attn"]) for p in report["points"]] == [
        (None, None, None), (0, 1, True), (6, 1, True), (10, 1, True), (6, 2, True),
        (6, 1, False), (10, 1, False), (6, 2, False)]
    assert ten["tokens_per_block"] == [17, 9]  # [8, 2]
    # 10 of 16 patches in block 0: more than half
    assert report["skipped"] == [{"merge_num": 10, "merge_every": 2, "prop_attn": prop} for prop in (True, False)]
    # without the log-size bias the same tokens are merged, and the predictions change
    for on, off in ((six, six_noprop), (ten, ten_noprop), (six_every2, six_every2_noprop)):
        assert off["tokens_per_block"] == on["tokens_per_block"] and off["nll"] != on["nll"]
    assert zero["top1"] == pytest.approx(plain["top1"], abs=1e-5) and zero["ece"] == pytest.approx(plain["ece"], abs=1e-5)
    assert six["tokens_per_block"] == [17, 13]  # 16 patches + CLS; decreasing schedule of 6 over 2 blocks: [4, 2]
    assert six_every2["tokens_per_block"] == [17, 11]  # all 6 in block 0
    table = (tmp_path / "res" / "tome.md").read_text()
    assert "| 6 | every block | 17 → 13, 15.0 |" in table and f"| {six['top1']:.2f} |" in table
    assert "| 6 | every 2 blocks | 17 → 11, 14.0 |" in table and "| – | – | plain (17) |" in table
    assert "| 6 | every 2 blocks, no prop. attn | 17 → 11, 14.0 |" in table
    assert ("Not evaluated, as a block would merge more than half of its tokens: merge_num 10 in every 2 blocks; "
            "merge_num 10 in every 2 blocks, no prop. attn.") in table
    assert (tmp_path / "res" / "tome.png").stat().st_size > 0


def test_eval_as_trained_sets_each_runs_own_merging_beside_its_plain_figures(tmp_path, capsys):
    """Each run is evaluated merged as its training forwards were (its merge_num, every k, bias off),
    which matches a separate `mergemix eval` with those flags, beside its own plain results.json;
    seeds of one run name group into one row. A run that never merged is refused, nothing written."""
    from mergemix import cli
    as_trained = load("eval_as_trained")
    tiny = ["--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2", "--epochs", "1",
            "--batch-size", "128", "--warmup-epochs", "0"]
    fast = ["--mix", "mergemix", "--aux-loss", "none", "--mix-opt", "prop_attn=false", "--merge-num", "6", "--merge-every", "2"]
    runs = [tmp_path / f"fast-s{seed}" for seed in (0, 1)]
    for seed, run in enumerate(runs):  # seed 1 evaluated merged while it trained: taken from its results.json
        assert cli.main(["train", "--output", str(tmp_path), "--experiment", run.name, "--seed", str(seed), *tiny, *fast,
                         *(["--eval-merged"] if seed else [])]) == 0
    assert as_trained.main(["--runs", *map(str, runs), "--name", "as", "--results-dir", str(tmp_path / "res")]) == 0
    report = json.loads((tmp_path / "res" / "as.json").read_text())
    row = report["table"]["fast"]
    assert (row["merge_num"], row["merge_every"], row["prop_attn"], row["seeds"]) == (6, 2, False, [0, 1])
    for seed, run in enumerate(runs):
        assert cli.main(["eval", "--checkpoint", str(run / "last.pth.tar"), "--merge-num", "6", "--merge-every", "2",
                         "--no-prop-attn", "--output", str(tmp_path / f"eval{seed}")]) == 0
        merged = json.loads((tmp_path / f"eval{seed}" / "results.json").read_text())
        plain = json.loads((run / "results.json").read_text())
        figures = report["runs"]["fast"][seed]
        assert figures["merged"]["top1"] == pytest.approx(merged["top1"]) and figures["plain"]["top1"] == plain["top1"]
        assert figures["merged"]["nll"] == pytest.approx(merged["nll"], abs=1e-5)
        assert figures["merged_by"] == ("mergemix train --eval-merged" if seed else "mergemix eval")
        assert row["diffs"][seed] == pytest.approx(merged["top1"] - plain["top1"])
    assert "| fast | 2 | 6 tokens, every 2 block(s), bias off |" in (tmp_path / "res" / "as.md").read_text()
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "cut-s0", "--seed", "0", *tiny, "--mix", "cutmix"]) == 0
    # a baseline that trained unmerged: each row's merged top-1 against its plain one, over the seeds both have
    assert as_trained.main(["--runs", *map(str, runs), "--baselines", str(tmp_path / "cut-s0"), "--name", "vs",
                            "--results-dir", str(tmp_path / "res")]) == 0
    versus = json.loads((tmp_path / "res" / "vs.json").read_text())["table"]["fast"]["vs"]["cut"]
    cut = json.loads((tmp_path / "cut-s0" / "results.json").read_text())["top1"]
    assert versus["seeds"] == [0] and versus["baseline_top1"] == cut
    assert versus["mean"] == pytest.approx(report["runs"]["fast"][0]["merged"]["top1"] - cut)
    assert f"| fast | cut | 1 | {cut:.2f} | {versus['mean']:+.2f} ± – |" in (tmp_path / "res" / "vs.md").read_text()
    capsys.readouterr()
    assert as_trained.main(["--runs", str(runs[0]), str(tmp_path / "cut-s0"), "--name", "no",
                            "--results-dir", str(tmp_path / "res")]) == 2
    assert "trained with --mix cutmix" in capsys.readouterr().err and not (tmp_path / "res" / "no.json").exists()


def test_gpu_script_passes_its_settings_to_step_time():
    """The one-call GPU script: what it would run, with an interpreter that only echoes its arguments."""
    import os
    import subprocess
    env = {**os.environ, "PYTHON": "echo", "MERGE_EVERY": "1 2", "CONFIGS": "none,merge clean,merge",
           "PROP_ATTN": "on off"}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_step_time.sh")], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    eager, compiled = out
    assert "--merge-every 1 2 --prop-attn on off --steps 20" in eager and "--compile" not in eager.split()
    assert "--merge-every 1 2 --prop-attn on off --warmup 3" in compiled
    assert compiled.endswith("--compile-mode reduce-overhead --compile-scope model --methods cutmix mergemix "
                             "--mergemix-configs none,merge clean,merge")
    env.pop("MERGE_EVERY"), env.pop("PROP_ATTN")
    eager = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_step_time.sh")], env={**env, "EAGER": "1"},
                           capture_output=True, text=True, check=True).stdout.splitlines()[0]
    assert "--merge-num 98 --merge-every 1 --prop-attn on --steps 20" in eager
    ab = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_step_time.sh")], env={**env, "MERGE_AB_REF": "old.py"},
                        capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(ab) == 3 and ab[0].startswith("benchmarks/merge_ab.py --ref old.py --device cuda")


@pytest.mark.parametrize("ref", ["HEAD", str(ROOT / "src" / "mergemix" / "merge.py")])
def test_merge_ab_compares_outputs_of_both_versions(tmp_path, capsys, ref):
    """merge_ab.py against HEAD's merge.py, or a merge.py file: both passes timed, and the results
    compared (the same code must agree exactly, so a real difference would show in max_abs_diff)."""
    out = tmp_path / "ab.json"
    assert load("merge_ab").main(["--ref", ref, "--batch-size", "2", "--tokens", "17", "--channels", "8", "--r", "4",
                                  "--reps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"forward", "forward+backward"}
    for r in report["results"].values():
        assert r["max_abs_diff"] == 0.0 and r["speedup"] == pytest.approx(r["ref_ms"] / r["now_ms"], rel=0.01)
    assert "| forward+backward |" in capsys.readouterr().out


def test_merge_ab_reports_the_difference_from_a_reference_that_merges_otherwise(tmp_path, capsys):
    """A reference merge.py whose merge weights are halved (a copy of the real one with that one line
    changed) moves every merged token and its gradient: max_abs_diff must show it, in both passes."""
    source = (ROOT / "src" / "mergemix" / "merge.py").read_text()
    line = "    weight = size_src / new_size.gather(1, m.dst)\n"
    assert source.count(line) == 1
    wrong = tmp_path / "merge_halved.py"
    wrong.write_text(source.replace(line, "    weight = 0.5 * size_src / new_size.gather(1, m.dst)\n"))
    out = tmp_path / "ab.json"
    assert load("merge_ab").main(["--ref", str(wrong), "--batch-size", "2", "--tokens", "17", "--channels", "8",
                                  "--r", "4", "--reps", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"forward", "forward+backward"}
    assert all(r["max_abs_diff"] > 0.01 for r in results.values()), results
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| f")}
    for label, r in results.items():  # the printed table's last column says so too
        assert rows[label].endswith(f"| {r['max_abs_diff']:.2g} |")


def test_step_time_shrinks_only_its_default_model_on_the_cpu():
    """The small CPU model is the default's; a model named with --model is built as timm defines it."""
    step_time = load("step_time")
    default = step_time.parse_args([])
    assert step_time.model_kwargs(default) == {"patch_size": 4, "depth": 6, "embed_dim": 128, "num_heads": 4}
    assert step_time.model_kwargs(step_time.parse_args(["--model", "deit_tiny_patch16_224"])) == {}
    on_gpu = step_time.parse_args([])
    on_gpu.device = torch.device("cuda")  # set after parsing: --device cuda is rejected on a machine without one
    assert step_time.model_kwargs(on_gpu) == {}
    named = step_time.parse_args(["--model", "deit_tiny_patch16_224", "--model-kwargs", "depth=2"])
    assert step_time.model_kwargs(named) == {"depth": 2}


@pytest.mark.parametrize("script, argv, message", [
    ("step_time", ["--out", "{tmp}"], "is a folder; give a file"),
    ("step_time", ["--out", "/proc/x.json"], "cannot write /proc/x.json"),
    ("step_time", ["--steps", "0"], "--steps: must be at least 1, got 0"),
    ("step_time", ["--batch-size", "1"], "--batch-size: must be at least 2, got 1"),
    ("step_time", ["--methods", "nosuch"], "invalid choice: 'nosuch'"),
    ("step_time", ["--mergemix-configs", "bogus"], "invalid choice: 'bogus'"),
    ("step_time", ["--model-kwargs", "depth"], "expected key=value, got 'depth'"),
    ("step_time", ["--compile-mode", "bogus"], "invalid choice: 'bogus'"),
    ("step_time", ["--merge-every", "0"], "--merge-every: must be at least 1, got 0"),
    ("merge_ab", ["--ref", "HEAD", "--r", "9", "--tokens", "17"], "--r 9 is more than half of the 16 patch tokens"),
    ("merge_ab", ["--ref", "HEAD", "--reps", "0"], "--reps: must be at least 1, got 0"),
    ("merge_ab", ["--ref", "HEAD", "--model", "nosuch"], "unknown model 'nosuch'"),
])
def test_step_time_and_merge_ab_reject_bad_flags_while_parsing(script, argv, message, tmp_path, capsys):
    """Checked before any timing: a usage error (exit 2) and no output file."""
    with pytest.raises(SystemExit) as done:
        load(script).main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert done.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, argv, message", [
    # 8x8 patches of 4 px: 64 tokens; the decreasing schedule of 100 over 6 blocks overfills block 1
    ("step_time", ["--methods", "cutmix", "--merge-num", "100"], "--merge-num 100 --merge-every 1 does not fit 64 "
                                                                 "patches: merge_num=100 is too large"),
    ("step_time", ["--model-kwargs", "foo=1"], "cannot be built with --model-kwargs foo=1"),
    ("merge_ab", ["--ref", "{tmp}/empty.py"], "has no merge_tokens function"),
    ("merge_ab", ["--ref", "{tmp}/broken.py"], "importing it failed (SyntaxError"),
    ("merge_ab", ["--ref", "no-such-commit"], "is neither a file nor a commit git can show"),
])
def test_step_time_and_merge_ab_report_unfit_input_in_one_line(script, argv, message, tmp_path, capsys):
    """Input that needs the model or the baseline file to judge: one error line, exit 2, before timing."""
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "broken.py").write_text("def (\n")
    out = tmp_path / "out.json"
    assert load(script).main([*[a.replace("{tmp}", str(tmp_path)) for a in argv], "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_compile_diagnostics_count_graphs_and_breaks():
    """The counters a compiled step_time run records: a function broken in two compiles two graphs."""
    step_time = load("step_time")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def broken(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    assert torch.equal(torch.compile(broken, backend="eager")(torch.ones(2)), torch.full((2,), 4.0))
    diagnostics = step_time.compile_diagnostics()
    assert diagnostics["unique_graphs"] == 2 and diagnostics["graph_breaks"] == 1
    phases = step_time.compile_phase_seconds()
    assert set(phases) == set(step_time.COMPILE_PHASES)
    assert phases["bytecode_tracing"] > 0  # dynamo traced two frames
    assert phases["compile_fx.<locals>.bw_compiler"] == 0  # the eager backend runs no Inductor


def test_step_time_table_shows_the_hand_captured_graphs_and_the_compile_counters():
    """A compiled CUDA run's extra figures: the uncompiled forwards replayed as CUDA graphs, the
    yardstick for the compiled evaluation, and the compile counters."""
    step_time = load("step_time")
    settings = step_settings(**DEIT_S_GPU, compile_mode="reduce-overhead")
    ev = {"plain_first_call_s": 2.0, "plain_images_per_s": 27000.0, "merged_every2_first_call_s": 75.0,
          "merged_every2_images_per_s": 17000.0, "merged_every2_speedup": 17000 / 27000,
          "plain_eager_graph_images_per_s": 21000.0, "merged_every2_eager_graph_images_per_s": 23600.0}
    result = {"device": "gpu", "settings": settings, "configs": {}, "eval_throughput": ev,
              "compile_diagnostics": {"unique_graphs": 5, "graph_breaks": 0, "cudagraph_skips": 1},
              "compile_phase_s": {k: 0.0 for k in step_time.COMPILE_PHASES} | {"async_compile.wait": 61.25}}
    table = step_time.markdown(result)
    assert "captured by hand: plain 21000 img/s, merged every2 23600 img/s." in table
    assert "Compilation: unique graphs 5, graph breaks 0, cudagraph skips 1." in table
    assert "; of which waiting for kernel compiles 61.2; " in table


def test_step_time_evaluation_marks_a_cuda_graph_generation_before_every_forward(monkeypatch):
    """The evaluation throughput follows evaluate(): a new CUDA-graph generation before each forward.
    Without it, the training steps' marks left the merged forward in reduce-overhead's warm-up, run
    kernel by kernel (0.62x plain on an H200), since a graph output it kept alive ended no path."""
    import argparse
    import contextlib
    import timm

    step_time = load("step_time")
    events = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=3)
    base.register_forward_pre_hook(lambda module, args: events.append("forward"))  # deep copies keep it
    args = argparse.Namespace(merge_every=[1, 2], prop_attn=[True], compile=False, compile_scope="model",
                              compile_mode=None, steps=2)
    ev = step_time.eval_throughput(base, torch.randn(4, 3, 32, 32), 4, args, torch.device("cpu"), contextlib.nullcontext)
    assert set(ev) >= {"plain_images_per_s", "merged_speedup", "merged_every2_speedup"}
    assert len(events) >= 2 * 3 * 2 and events == ["mark", "forward"] * (len(events) // 2)


def test_eval_throughput_interleaves_the_timed_forwards(monkeypatch):
    """Plain and merged forwards take turns, as the training steps do: drift hits them alike."""
    import argparse
    import contextlib

    import timm

    step_time = load("step_time")
    timed, seen = [], {}
    monkeypatch.setattr(step_time, "seconds", lambda fn, device: timed.append(fn.__defaults__[0]) or 0.5)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=3)
    args = argparse.Namespace(merge_every=[1, 2], prop_attn=[True], compile=False, compile_scope="model",
                              compile_mode=None, steps=5)
    ev = step_time.eval_throughput(base, torch.randn(4, 3, 32, 32), 4, args, torch.device("cpu"), contextlib.nullcontext)
    order = [seen.setdefault(id(net), len(seen)) for net in timed]  # each model numbered as first timed
    assert order == [0, 1, 2] * 5
    assert ev["plain_images_per_s"] == 4 / 0.5 and ev["merged_every2_speedup"] == 1.0


def test_a_compiled_step_time_run_keeps_its_compile_figures_when_the_evaluation_fails(tmp_path, monkeypatch):
    """The compile counters and phase seconds are written with the step times, before the mask
    work and the evaluation, so a GPU run stopped by its time limit still shows where the training
    passes' compile went ('eager' dynamo backend: traced, not compiled, so the test stays fast)."""
    step_time = load("step_time")
    monkeypatch.setattr(step_time, "compile_model", lambda model, scope, **kw: torch.compile(model, backend="eager"))

    def out_of_time(*args, **kwargs):
        raise KeyboardInterrupt  # what a time limit's signal handler may raise, mid-evaluation

    monkeypatch.setattr(step_time, "eval_throughput", out_of_time)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # process-wide: earlier tests' graphs and breaks are not this run's
    out = tmp_path / "st.json"
    tiny = ["--model-kwargs", "patch_size=8", "depth=2", "embed_dim=32", "num_heads=2", "--img-size", "32",
            "--batch-size", "4", "--warmup", "1", "--steps", "1", "--num-classes", "10"]
    with pytest.raises(KeyboardInterrupt):
        step_time.main([*tiny, "--compile", "--methods", "cutmix", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["configs"]["cutmix"]["warmup_s"] > 0 and "eval_throughput" not in result
    assert result["compile_diagnostics"]["unique_graphs"] >= 1 and result["compile_diagnostics"]["graph_breaks"] == 0
    assert result["compile_phase_s"]["bytecode_tracing"] > 0
    assert "Compile seconds by phase" in out.with_suffix(".md").read_text()


def test_provenance_commit_is_dirty_for_changed_code_not_for_written_results(tmp_path):
    """A table written by one benchmark does not mark the next one's rows "-dirty"; a changed source file does."""
    import subprocess

    common = load("bench_common")

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "train.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("| row |\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "benchmarks" / "results" / "table.md").write_text("| row |\n| another |\n")
    assert common.git_commit(tmp_path) == head
    (tmp_path / "train.py").write_text("a = 2\n")
    assert common.git_commit(tmp_path) == head + "-dirty"


def _hand_table():
    """Three fake runs per method, figures chosen so that mean, sample std and paired SE are exact by hand."""
    return {"mergemix": _runs([0, 1, 2], [80.0, 82.0, 84.0], [0.10, 0.12, 0.14], 0.6, 0.25, [2.0, 3.0, 4.0]),
            # listed out of seed order: 83 is seed 2's
            "cutmix": _runs([2, 0, 1], [83.0, 78.0, 79.0], [0.20, 0.20, 0.20], 0.7, 0.35, [2.0, 2.0, 2.0]),
            "none": _runs([0, 1, 2], [85.0, 86.0, 87.0], [0.05, 0.05, 0.05], 0.5, 0.15, [1.0, 1.0, 1.0])}


def test_accuracy_table_by_hand_mean_sample_std_order_and_cutmix_time():
    """By hand: mergemix 80, 82, 84 -> 82 ± 2; cutmix 78, 79, 83 -> 80 ± √7 = 2.65 (√(14/3) = 2.16 were the
    population std); none 85, 86, 87 -> 86 ± 1. Rows by descending top-1 (none, mergemix, cutmix); s/epoch
    3.0, 2.0, 1.0, so × CutMix time 1.50, 1.00, 0.50. Paired with mergemix by seed: none +5, +4, +3 ->
    +4 ± 1/√3 = 0.58; cutmix (seeds 0, 1, 2) -2, -3, -1 -> -2 ± 0.58; rows by descending difference."""
    accuracy = load("accuracy")
    raw = _hand_table()
    table = {label: accuracy.aggregate(runs) for label, runs in raw.items()}
    assert table["cutmix"]["top1"] == pytest.approx(80.0) and table["cutmix"]["top1_std"] == pytest.approx(7 ** 0.5)
    assert table["mergemix"]["ece_std"] == pytest.approx(0.02) and table["mergemix"]["epoch_time"] == pytest.approx(3.0)
    text = accuracy.markdown("digits", "quick", table, raw, ["--epochs", "8"])
    main, paired = text.split("Paired by seed")
    rows = [line for line in main.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["| none | 3 | 86.00 ± 1.00 | 0.0500 ± 0.0000 | 0.5000 | 0.1500 | 1.0 | 0.50 |",
                    "| mergemix | 3 | 82.00 ± 2.00 | 0.1200 ± 0.0200 | 0.6000 | 0.2500 | 3.0 | 1.50 |",
                    "| cutmix | 3 | 80.00 ± 2.65 | 0.2000 ± 0.0000 | 0.7000 | 0.3500 | 2.0 | 1.00 |"]
    rows = [line for line in paired.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["| none | 3 | +4.00 ± 0.58 | +5.00, +4.00, +3.00 | -0.0700 ± 0.0115 |",
                    "| cutmix | 3 | -2.00 ± 0.58 | -2.00, -3.00, -1.00 | +0.0800 ± 0.0115 |"]
    # without a CutMix row there is no ratio to show
    del table["cutmix"], raw["cutmix"]
    assert "| 3.0 | – |" in accuracy.markdown("digits", "quick", table, raw, ["--epochs", "8"])


def test_accuracy_figure_puts_each_row_at_its_ece_and_top1_with_its_stds_as_bars():
    """One point per row at (ECE, top-1), horizontal bar ± the ECE std, vertical bar ± the top-1 std, and
    its label at that point."""
    import matplotlib.pyplot as plt
    accuracy = load("accuracy")
    table = {label: accuracy.aggregate(runs) for label, runs in _hand_table().items()}
    fig = accuracy.figure("digits", "quick", ["--epochs", "8"], table)
    ax = fig.axes[0]
    for container, (label, t) in zip(ax.containers, table.items()):
        data_line, _, (xbars, ybars) = container.lines
        assert data_line.get_xydata().tolist() == [[t["ece"], t["top1"]]]
        (x_segment,), (y_segment,) = xbars.get_segments(), ybars.get_segments()
        assert x_segment.ravel().tolist() == pytest.approx([t["ece"] - t["ece_std"], t["top1"], t["ece"] + t["ece_std"], t["top1"]])
        assert y_segment.ravel().tolist() == pytest.approx([t["ece"], t["top1"] - t["top1_std"], t["ece"], t["top1"] + t["top1_std"]])
    assert {a.get_text(): tuple(a.xy) for a in ax.texts} == {label: (t["ece"], t["top1"]) for label, t in table.items()}
    plt.close(fig)


def test_accuracy_run_one_reads_the_mean_epoch_time_of_a_finished_run(tmp_path):
    """A finished run is read, not rerun: its s/epoch is the mean of summary.csv's epochs (1, 2, 6 s -> 3, where
    the median would be 2)."""
    accuracy = load("accuracy")
    run = tmp_path / "digits-none-s0"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"top1": 90.0, "seed": 0}))
    (run / "summary.csv").write_text("epoch,epoch_time\n0,1.0\n1,2.0\n2,6.0\n")
    assert accuracy.run_one(["--never-run"], run, 1) == {"top1": 90.0, "seed": 0, "epoch_time": 3.0, "epochs": 3}


def test_accuracy_equal_time_rounds_the_share_of_the_epochs():
    """Quick mode trains 8 epochs: 0.6 of them is 4.8, so equal time is 5 epochs (not 4.8 cut down to 4)."""
    accuracy = load("accuracy")
    assert accuracy.plan("quick", "digits", accuracy.RECIPES["digits"]["quick"], None)["mergemix[equal time]"][-1] == "5"


def test_median_ms_times_in_ms_after_a_warm_up_and_takes_the_median(monkeypatch):
    """Each fn is called once untimed, then the calls alternate; the figure is the median in ms of the timed
    calls: a at 1, 2, 9 ms -> 2 (the mean would be 4), b at 5, 4, 3 ms -> 4."""
    common = load("bench_common")
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    durations = iter([0.001, 0.005, 0.002, 0.004, 0.009, 0.003])

    def seconds(fn, device):
        fn()
        return next(durations)
    monkeypatch.setattr(common, "seconds", seconds)
    assert common.median_ms(fns, torch.device("cpu"), 3) == pytest.approx({"a": 2.0, "b": 4.0})
    assert calls == ["a", "b"] + ["a", "b"] * 3


class _Runner:
    """What step_rows and mask_work read of a step_time Runner."""

    def __init__(self, label, times):
        from types import SimpleNamespace
        self.label, self.times = label, times
        self.objective = SimpleNamespace(name=label.split("[")[0], passes="1 fwd + 1 bwd")
        self.peak, self.warmup_s, self.kernel_ops = None, 1.0, None


def test_step_rows_are_medians_as_ratios_to_cutmix_wherever_it_ran():
    """By hand: CutMix's steps 2, 10, 4 ms -> median 4 (mean 5.33); MixUp's 4, 6, 20 -> median 6, so 1.50 x CutMix.
    CutMix is not the first runner (`--methods mixup cutmix` runs it second)."""
    step_time = load("step_time")
    runners = [_Runner("mixup", [0.004, 0.006, 0.020]), _Runner("cutmix", [0.002, 0.010, 0.004])]
    rows = step_time.step_rows(runners)
    assert rows["mixup"]["median_step_ms"] == pytest.approx(6.0) and rows["mixup"]["ratio_to_cutmix"] == pytest.approx(1.5)
    assert rows["cutmix"]["median_step_ms"] == pytest.approx(4.0) and rows["cutmix"]["ratio_to_cutmix"] == 1.0
    assert rows["mixup"]["step_ms"] == [4.0, 6.0, 20.0]  # every timed step


def test_mask_work_is_a_share_of_the_clean_mergemix_steps_median(monkeypatch):
    """The mask work (1 ms, stubbed) over the median step of mergemix[clean,merge] (10, 20, 60 ms -> 20; the mean
    would be 30): 5 %, shown as such in the table."""
    step_time = load("step_time")
    monkeypatch.setattr(step_time, "mask_work_seconds", lambda runner, x, device, reps: 0.001)
    runners = [_Runner("cutmix", [0.01] * 3), _Runner("mergemix[none,merge]", [0.001] * 3),
               _Runner("mergemix[clean,merge]", [0.010, 0.020, 0.060])]
    work = step_time.mask_work(runners, None, torch.device("cpu"), 3)
    assert work == {"ms": pytest.approx(1.0), "share_of_mergemix_step": pytest.approx(0.05),
                    "measured_on": "mergemix[clean,merge]"}
    settings = step_settings()
    table = step_time.markdown({"device": "cpu", "settings": settings, "configs": step_time.step_rows(runners),
                                "mask_work": work})
    assert "Mask work (recover + top-k + upsample + mix): 1.00 ms, 5.0 % of a mergemix[clean,merge] step." in table


def test_step_time_table_lists_configurations_by_ascending_ratio():
    step_time = load("step_time")
    settings = step_settings()
    rows = step_time.step_rows([_Runner("mergemix[clean,merge]", [0.016] * 3), _Runner("cutmix", [0.010] * 3),
                                _Runner("mixup", [0.009] * 3)])
    table = step_time.markdown({"device": "cpu", "settings": settings, "configs": rows})
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "passes" not in line] == [
        "| mixup", "| cutmix", "| mergemix[clean,merge]"]
    assert "| mixup | 1 fwd + 1 bwd | 9.0 | 0.90 |" in table and "| mergemix[clean,merge] | 1 fwd + 1 bwd | 16.0 | 1.60 |" in table


def test_eval_throughput_is_images_over_the_median_forward(monkeypatch):
    """Five rounds (at least 5) of plain and merged, alternating: plain at 1, 1, 1, 1, 6 s -> median 1 s, 4 images/s
    (the mean, 2 s, would give 2); merged at 0.5 s but one 3 s round -> 8 images/s, 2.00 x plain."""
    import argparse
    import contextlib

    import timm

    step_time = load("step_time")
    durations = iter([1.0, 0.5, 1.0, 0.5, 1.0, 3.0, 1.0, 0.5, 6.0, 0.5])
    monkeypatch.setattr(step_time, "seconds", lambda fn, device: next(durations))
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                             num_classes=3)
    args = argparse.Namespace(merge_every=[1], prop_attn=[True], compile=False, compile_scope="model",
                              compile_mode=None, steps=2)
    ev = step_time.eval_throughput(base, torch.randn(4, 3, 32, 32), 4, args, torch.device("cpu"), contextlib.nullcontext)
    assert ev["plain_images_per_s"] == 4.0 and ev["merged_images_per_s"] == 8.0 and ev["merged_speedup"] == 2.0


def test_eval_as_trained_summary_and_baselines_by_hand():
    """Three seeds by hand: plain 70, 72, 74 -> 72 ± 2; merged 71, 72, 76 -> 73 ± √7 = 2.65 (sample std);
    merged - plain 1, 0, 2 -> +1 ± 1/√3 = 0.58. Against a baseline listed out of seed order, with a seed the rows
    lack: 65, 66, 60 for seeds 0, 1, 2 -> their top-1 63.67, merged - theirs 6, 6, 16 -> +9.33 ± √(100/3)/√3 = 3.33."""
    as_trained = load("eval_as_trained")
    merging = {"merge_num": 6, "merge_every": 2, "prop_attn": False, "merge_train": True}
    rows = [{"seed": s, "merging": merging, "plain": {"top1": p, "ece": 0.1, "nll": 0.5},
             "merged": {"top1": m, "ece": 0.2, "nll": 0.6}} for s, p, m in ((0, 70.0, 71.0), (1, 72.0, 72.0), (2, 74.0, 76.0))]
    s = as_trained.summary(rows)
    assert s["seeds"] == [0, 1, 2] and s["merge_num"] == 6
    assert (s["plain_top1"], s["plain_top1_std"]) == (pytest.approx(72.0), pytest.approx(2.0))
    assert (s["merged_top1"], s["merged_top1_std"]) == (pytest.approx(73.0), pytest.approx(7 ** 0.5))
    assert s["diffs"] == [1.0, 0.0, 2.0] and s["diff_top1"] == pytest.approx(1.0) and s["diff_top1_se"] == pytest.approx(3 ** -0.5)
    vs = as_trained.against_baselines(rows, {"cut": {2: 60.0, 0: 65.0, 5: 99.0, 1: 66.0}})["cut"]
    assert vs["seeds"] == [0, 1, 2] and vs["diffs"] == [6.0, 6.0, 16.0]
    assert vs["baseline_top1"] == pytest.approx(191 / 3) and vs["mean"] == pytest.approx(28 / 3)
    assert vs["se"] == pytest.approx(10 / 3)
    text = as_trained.markdown({"fast": {**s, "vs": {"cut": vs}}})
    assert ("| fast | 3 | 6 tokens, every 2 block(s), bias off | 72.00 ± 2.00 | 73.00 ± 2.65 | +1.00 ± 0.58 | 0.1000 "
            "| 0.2000 |") in text
    assert "| fast | cut | 3 | 63.67 | +9.33 ± 3.33 | +6.00, +6.00, +16.00 |" in text


def test_tome_eval_speedups_are_each_points_images_per_s_over_the_plain_pass():
    """Plain 100 images/s, merged 150 and 200: 1.50 and 2.00 x plain, in the table and on the figure's x axis."""
    import matplotlib.pyplot as plt
    tome_eval = load("tome_eval")
    plain = {"merge_num": None, "merge_every": None, "prop_attn": None, "tokens_per_block": None, "top1": 70.0,
             "ece": 0.2, "nll": 1.0, "brier": 0.4, "images_per_s": 100.0}
    merged = [{"merge_num": n, "merge_every": 1, "prop_attn": True, "tokens_per_block": [17, 17 - n], "top1": 70.0 - n,
               "ece": 0.2, "nll": 1.0, "brier": 0.4, "images_per_s": ips} for n, ips in ((4, 150.0), (8, 200.0))]
    report = {"model": "vit", "dataset": "digits", "checkpoint": "ckpt", "num_images": 10, "num_tokens": 17,
              "points": [plain, *merged]}
    table = tome_eval.markdown(report)
    assert "| 100 | 1.00 |" in table and "| 150 | 1.50 |" in table and "| 200 | 2.00 |" in table
    fig = tome_eval.figure(report)
    top1_axis, _, tokens_axis = fig.axes
    assert top1_axis.lines[0].get_xydata().tolist() == [[1.5, 66.0], [2.0, 62.0]]
    assert tokens_axis.lines[0].get_xydata().tolist() == [[15.0, 1.5], [13.0, 2.0]]
    plt.close(fig)
