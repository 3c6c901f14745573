"""accuracy.py, tome_eval.py, eval_as_trained.py and gpu_step_time.sh reject bad input up front: one
line, exit 2, and no run launched or file written; a failed run or step shows in the exit status."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark_scripts import ROOT, load

GPU_SCRIPT = ROOT / "benchmarks" / "gpu_step_time.sh"
FIGURES = {"top1": 90.0, "ece": 0.05, "nll": 0.3, "brier": 0.1, "epoch_time": 1.0}


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def error_line(capsys) -> str:
    """The one line a ConfigError printed (and nothing else on stderr)."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def accuracy(tmp_path, monkeypatch):
    """accuracy.py writing its tables under tmp_path/results; run_one records the runs instead of training."""
    module = load("accuracy")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    module.launched = []

    def run_one(cmd: list[str], run_dir: Path, threads: int) -> dict:
        module.launched.append(run_dir.name)
        return {**FIGURES, "seed": int(cmd[cmd.index("--seed") + 1])}  # a run's results.json names its seed
    monkeypatch.setattr(module, "run_one", run_one)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "bogus"], "invalid choice: 'bogus'"),
    (["--jobs", "0"], "--jobs: must be at least 1, got 0"),
    (["--jobs", "-1"], "--jobs: must be at least 1, got -1"),
    (["--seeds", "-1"], "--seeds: must be at least 1, got -1"),
    (["--seeds", "0"], "--seeds: must be at least 1, got 0"),  # not "the mode's default"
])
def test_accuracy_rejects_bad_flags_while_parsing(accuracy, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        accuracy.main([*argv, "--runs-dir", str(tmp_path / "runs")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert accuracy.launched == [] and files_under(tmp_path) == []


def test_accuracy_rejects_a_file_as_runs_dir(accuracy, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        accuracy.main(["--runs-dir", str(runs)])
    assert e.value.code == 2 and "is a file; give a folder" in capsys.readouterr().err
    assert accuracy.launched == [] and not (tmp_path / "results").exists()


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "fashion-mnist"], "fashion-mnist has no quick recipe; its modes: full, long, small-data"),
    (["--mode", "gpu", "--datasets", "digits"], "digits has no gpu recipe; its modes: quick, full, long"),
    (["--methods", "bogus"], "--methods bogus: not a label of quick mode on digits; choose from: none, mixup,"),
    # quick mode has no ablations: the label must not be dropped silently
    (["--methods", "mergemix", "mergemix[lam=gaussian]"], "--methods mergemix[lam=gaussian]: not a label of quick mode"),
    # full mode runs the ablations on digits only: Fashion-MNIST would get an empty table
    (["--mode", "full", "--methods", "mergemix[lam=gaussian]"], "none of --methods runs on fashion-mnist in full mode; "
                                                                "leave it out with --datasets digits"),
])
def test_accuracy_rejects_datasets_and_methods_the_mode_does_not_run(accuracy, tmp_path, capsys, argv, message):
    assert accuracy.main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert message in error_line(capsys)
    assert accuracy.launched == [] and not (tmp_path / "results").exists()


def test_accuracy_checks_its_result_files_before_the_runs(accuracy, tmp_path, capsys):
    (tmp_path / "results" / "digits_quick.md").mkdir(parents=True)  # a folder where the table goes
    assert accuracy.main(["--methods", "none", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "digits_quick.md is a folder" in error_line(capsys)
    assert accuracy.launched == [] and files_under(tmp_path / "results") == []


def test_accuracy_runs_the_labels_each_dataset_has(accuracy, tmp_path):
    """Valid input gets through the checks: an ablation runs on the datasets that have it, on every
    seed asked for as the methods do (the issue asks at least 3 for each row), and each dataset's
    table is written."""
    argv = ["--mode", "full", "--methods", "mergemix", "mergemix[lam=gaussian]", "--seeds", "3",
            "--runs-dir", str(tmp_path / "runs")]
    assert accuracy.main(argv) == 0
    assert sorted(accuracy.launched) == [f"{run}-s{seed}" for run in ("digits-mergemix", "digits-mergemix_lam-gaussian",
                                                                      "fashion-mnist-mergemix") for seed in range(3)]
    assert {p.name for p in files_under(tmp_path / "results")} == {
        f"{d}.{suffix}" for d in ("digits", "fashion-mnist") for suffix in ("json", "md", "png")}


def test_accuracy_rows_say_where_and_with_what_they_were_made(accuracy, tmp_path):
    """Each row records its runs-at-once count and provenance; a row kept from an earlier run of
    the table keeps its own. The commit is the checkout's HEAD; a CPU run names its threads."""
    import torch
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    runs = ["--runs-dir", str(tmp_path / "runs")]
    assert accuracy.main(["--methods", "none", "mixup", "--seeds", "2", "--jobs", "2", *runs]) == 0
    assert accuracy.main(["--methods", "mixup", "--seeds", "2", *runs]) == 0
    path = tmp_path / "results" / "digits_quick"
    table = json.loads(path.with_suffix(".json").read_text())["table"]
    assert {label: row["jobs"] for label, row in table.items()} == {"none": 2, "mixup": 1}
    made = table["none"]["provenance"]
    threads = max(1, (os.cpu_count() or 1) // 2)  # each of --jobs 2 runs gets half the cores
    assert made["device"].startswith("cpu (") and made["device"].endswith(f", {threads} threads)")
    assert made["host"].endswith(f", {os.cpu_count()} cores") and made["commit"].startswith(head)
    assert made["versions"]["torch"] == torch.__version__
    text = path.with_suffix(".md").read_text()
    # the two rows ran with 1 and 2 threads: the line names each one's rows
    assert "with 1 or 2 runs sharing the machine" in text and f"commit {made['commit']} (none); on " in text


def test_accuracy_reuses_a_finished_run_only_for_the_settings_it_was_made_with(tmp_path, monkeypatch, capsys):
    """A finished run is reused under a label only if it trained as this command would: with the
    record of its command, or without it, by its args.yaml. Otherwise nothing runs."""
    accuracy = load("accuracy")
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path / "results")
    trained = []

    def train(cmd, cwd, stdout, stderr, env):  # `mergemix train` as far as accuracy.py reads its runs
        trained.append(cmd)
        run = Path(cmd[cmd.index("--output") + 1]) / cmd[cmd.index("--experiment") + 1]
        (run / "results.json").write_text(json.dumps({**FIGURES, "seed": 0}))
        (run / "summary.csv").write_text("epoch,epoch_time\n0,1.0\n")
        return SimpleNamespace(returncode=0)
    monkeypatch.setattr(accuracy, "subprocess", SimpleNamespace(run=train, STDOUT=subprocess.STDOUT))
    runs = tmp_path / "runs"
    run = runs / "quick" / "digits-none-s0"
    quick = ["--methods", "none", "--seeds", "1", "--runs-dir", str(runs)]
    assert accuracy.main([*quick, "--extra", "--epochs", "2"]) == 0 and len(trained) == 1
    assert json.loads((run / "command.json").read_text())["argv"] == trained[0][4:]  # the flags after `train`
    # the same settings: reused, also with another place to read the data from
    assert accuracy.main([*quick, "--extra", "--epochs", "2"]) == 0
    assert accuracy.main([*quick, "--extra", "--data-dir", str(tmp_path), "--epochs", "2"]) == 0
    capsys.readouterr()
    # quick mode's 8 epochs: not the run's 2
    assert accuracy.main(quick) == 2
    assert error_line(capsys) == (f"error: {run} is a finished run with other settings (--epochs 2 there, 8 now): "
                                  "remove that folder or use another --runs-dir")
    (run / "command.json").unlink()  # a run of an older version: its args.yaml says how it trained
    (run / "args.yaml").write_text("mix: none\nepochs: 2\n")
    assert accuracy.main(quick) == 2 and "(--epochs 2 there, 8 now)" in error_line(capsys)
    assert accuracy.main([*quick, "--extra", "--epochs", "2"]) == 0
    assert len(trained) == 1


def test_accuracy_stops_at_a_failed_run_and_tables_the_labels_that_finished(accuracy, tmp_path, capsys):
    """The failure is printed when it happens, no queued run starts after it, and the table keeps
    the labels whose runs all finished; the exit status says what happened."""
    def run_one(argv: list[str], run_dir: Path, threads: int) -> dict:
        accuracy.launched.append(run_dir.name)
        if run_dir.name == "digits-mixup-s0":
            raise accuracy.RunFailed(f"{run_dir.name} failed (exit 1); see its log")
        return {**FIGURES, "seed": int(argv[argv.index("--seed") + 1])}
    accuracy.run_one = run_one
    argv = ["--mode", "full", "--methods", "none", "mixup", "cutmix", "--seeds", "2", "--runs-dir", str(tmp_path / "runs")]
    assert accuracy.main(argv) == 1
    assert accuracy.launched == ["digits-none-s0", "digits-none-s1", "digits-mixup-s0"]
    out = capsys.readouterr()
    assert "[digits] digits-mixup-s0 failed (exit 1); see its log; no further run starts\n" in out.out
    assert out.err == ("error: 1 run(s) of digits failed (digits-mixup-s0 failed (exit 1); see its log); "
                       "digits.json/.md/.png hold the labels whose runs all finished; fashion-mnist not run\n")
    assert set(json.loads((tmp_path / "results" / "digits.json").read_text())["table"]) == {"none"}
    assert not (tmp_path / "results" / "fashion-mnist.json").exists()


def test_accuracy_replot_redraws_the_figures_from_their_tables_alone(accuracy, tmp_path, capsys):
    argv = ["--mode", "full", "--methods", "none", "--seeds", "2", "--runs-dir", str(tmp_path / "runs")]
    assert accuracy.main(argv) == 0
    results = tmp_path / "results"
    tables = {p.name: p.read_text() for p in results.glob("*.json")}
    for png in results.glob("*.png"):
        png.unlink()
    accuracy.launched.clear()
    assert accuracy.main(["--mode", "full", "--replot"]) == 0
    assert accuracy.launched == [] and {p.name: p.read_text() for p in results.glob("*.json")} == tables
    assert {p.name for p in results.glob("*.png")} == {"digits.png", "fashion-mnist.png"}
    capsys.readouterr()
    assert accuracy.main(["--mode", "long", "--replot"]) == 2
    assert f"--replot: no table {results / 'digits_long.json'} to draw; run long mode first" in error_line(capsys)


@pytest.fixture
def tome_eval(monkeypatch):
    """tome_eval.py with `mergemix eval` replaced: the plain pass gives figures, every merged point
    is too large for the model (None, as exit 2 of eval gives)."""
    module = load("tome_eval")
    module.evaluated = []

    def evaluate(checkpoint: str, merge_num: int | None, merge_every: int, prop_attn: bool, extra: list[str],
                 out: Path) -> dict | None:
        module.evaluated.append(merge_num)
        if merge_num:
            return None
        return {"model": "vit", "dataset": "digits", "num_images": 10, "images_per_s": 100.0, **FIGURES}
    monkeypatch.setattr(module, "evaluate", evaluate)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--merge-nums", "0", "-4"], "--merge-nums: must be at least 0, got -4"),
    (["--merge-every", "0"], "--merge-every: must be at least 1, got 0"),
    (["--prop-attn", "maybe"], "--prop-attn: invalid choice: 'maybe'"),
])
def test_tome_eval_rejects_bad_schedules_while_parsing(tome_eval, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        tome_eval.main(["--checkpoint", "ckpt", "--results-dir", str(tmp_path / "res"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert tome_eval.evaluated == [] and not (tmp_path / "res").exists()


def test_tome_eval_checks_its_result_files_before_evaluating(tome_eval, tmp_path, capsys):
    res = tmp_path / "res"
    res.write_text("a file")
    assert tome_eval.main(["--checkpoint", "ckpt", "--results-dir", str(res)]) == 2
    assert f"--results-dir {res}: {res} is a file; give a folder" in error_line(capsys)
    res.unlink()
    (res / "tome_eval.png").mkdir(parents=True)
    assert tome_eval.main(["--checkpoint", "ckpt", "--results-dir", str(res)]) == 2
    assert "tome_eval.png is a folder" in error_line(capsys)
    if Path("/proc/self").is_dir():  # a folder no file can be created in
        assert tome_eval.main(["--checkpoint", "ckpt", "--results-dir", "/proc"]) == 2
        assert "cannot write /proc/tome_eval.json" in error_line(capsys)
    assert tome_eval.evaluated == [] and files_under(res) == []


def test_tome_eval_table_without_merged_points(tome_eval, tmp_path):
    """Every merged point too large: the plain row shows no token count rather than 'None'."""
    assert tome_eval.main(["--checkpoint", "ckpt", "--merge-nums", "40", "--results-dir", str(tmp_path)]) == 0
    assert tome_eval.evaluated == [None, None, 40]  # warm-up, plain, the merged point
    table = (tmp_path / "tome_eval.md").read_text()
    assert "| – | – | plain | 90.00 |" in table and "None" not in table
    assert "merge_num 40 in every block." in table


def test_tome_eval_replot_redraws_the_figure_from_its_json_alone(tome_eval, tmp_path, capsys):
    assert tome_eval.main(["--checkpoint", "ckpt", "--merge-nums", "40", "--results-dir", str(tmp_path)]) == 0
    report = (tmp_path / "tome_eval.json").read_text()
    (tmp_path / "tome_eval.png").unlink()
    tome_eval.evaluated.clear()
    assert tome_eval.main(["--replot", "--results-dir", str(tmp_path)]) == 0
    assert tome_eval.evaluated == [] and (tmp_path / "tome_eval.json").read_text() == report
    assert (tmp_path / "tome_eval.png").stat().st_size > 0
    assert tome_eval.main(["--replot", "--name", "other", "--results-dir", str(tmp_path)]) == 2
    assert f"--replot: no {tmp_path / 'other.json'} to draw" in error_line(capsys)
    with pytest.raises(SystemExit):
        tome_eval.main(["--replot", "--checkpoint", "ckpt", "--results-dir", str(tmp_path)])
    assert "--checkpoint: not allowed with argument --replot" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/missing"], "error: no checkpoint at"),
    (["--checkpoint", "{tmp}/missing", "--extra", "--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_tome_eval_reports_a_failed_eval_once(tmp_path, capsys, argv, message):
    """The real `mergemix eval` fails at the warm-up pass: its error line alone, and its exit code."""
    tome_eval = load("tome_eval")
    with pytest.raises(SystemExit) as e:
        tome_eval.main([a.format(tmp=tmp_path) for a in argv] + ["--results-dir", str(tmp_path / "res")])
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert files_under(tmp_path) == []


def gpu_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the GPU script with a stand-in interpreter that logs each call's script to tmp_path/calls
    and exits with $FAIL_CODE when its arguments match $FAIL (a shell pattern)."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\necho "$1" >> "$CALLS"\n'
                        'echo "$* | ${TORCHINDUCTOR_CACHE_DIR:-} ${TRITON_CACHE_DIR:-}" >> "$CALLS.args"\n'
                        'case "$*" in $FAIL) [ "$FAIL_CODE" = sleep ] && exec sleep 5; exit "$FAIL_CODE";; esac\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stand_in), "CALLS": str(tmp_path / "calls"), "FAIL": "", "FAIL_CODE": "0",
           **env}
    return subprocess.run(["bash", str(GPU_SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_gpu_script_help_lists_its_settings_and_runs_nothing(tmp_path):
    for flag in ("-h", "--help"):
        r = gpu_script(tmp_path, flag)
        assert r.returncode == 0 and r.stdout.startswith("usage: ")
        read = set(re.findall(r"\$\{([A-Z_]+)", GPU_SCRIPT.read_text()))  # every setting the script reads
        assert read >= {"PYTHON", "MERGE_AB_REF", "CONFIGS"} and all(name in r.stdout for name in read)
    assert calls(tmp_path) == []


def test_gpu_script_rejects_arguments(tmp_path):
    r = gpu_script(tmp_path, "--steps", "5")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "takes no arguments, got '--steps 5'" in r.stderr
    assert calls(tmp_path) == []


def test_gpu_script_rejects_a_bad_cache_setting_before_any_step(tmp_path):
    r = gpu_script(tmp_path, CACHE="warm")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: CACHE must be cold-warm or unset, got 'warm'"]
    assert calls(tmp_path) == []


def test_gpu_script_compiles_twice_on_its_own_caches_for_cold_warm(tmp_path):
    """CACHE=cold-warm: two compiled runs, tagged, on one fresh Inductor and Triton cache that is
    removed afterwards; the eager run is not repeated."""
    assert gpu_script(tmp_path, CACHE="cold-warm").returncode == 0
    eager, cold, warm = (tmp_path / "calls.args").read_text().splitlines()
    assert "--compile" not in eager.split() and "--tag" not in eager.split()
    assert " --tag cache-cold |" in cold and " --tag cache-warm |" in warm
    inductor, triton = cold.split(" | ")[1].split()
    assert warm.split(" | ")[1] == f"{inductor} {triton}"
    assert Path(inductor).name == "inductor" and Path(triton).parent == Path(inductor).parent
    assert not Path(inductor).parent.exists()
    assert gpu_script(tmp_path, CACHE="").returncode == 0  # unset: one compiled run, the user's own caches
    assert "--tag" not in (tmp_path / "calls.args").read_text().splitlines()[-1].split()


def test_gpu_script_runs_every_step_and_fails_if_one_did(tmp_path):
    r = gpu_script(tmp_path, MERGE_AB_REF="/nonexistent/merge.py", FAIL="*merge_ab.py*", FAIL_CODE="3")
    assert r.returncode == 1
    assert calls(tmp_path) == ["benchmarks/merge_ab.py", "benchmarks/step_time.py", "benchmarks/step_time.py"]
    assert r.stderr.strip().endswith("failed steps: merge_ab (exit 3)")
    (tmp_path / "calls").unlink()
    # a step stopped by its time limit is named as such; the steps that passed are not named
    r = gpu_script(tmp_path, FAIL="*--compile*", FAIL_CODE="sleep", COMPILED_TIMEOUT="0.2")
    assert r.returncode == 1 and len(calls(tmp_path)) == 2
    assert r.stderr.strip().endswith("failed steps: compiled (timed out)")
    (tmp_path / "calls").unlink()
    assert gpu_script(tmp_path).returncode == 0 and len(calls(tmp_path)) == 2


@pytest.mark.parametrize("layout, why", [
    ({"a/fast-s0": 0, "b/fast-s1": 1}, "in different folders"),  # one row's name in two folders: maybe two recipes
    ({"a/fast-s0": 0, "a/fast-s00": 0}, "both seed 0"),  # one seed twice: one would overwrite the other
])
def test_eval_as_trained_refuses_runs_that_would_share_a_row(tmp_path, monkeypatch, capsys, layout, why):
    """Before any evaluation: one error line naming both runs, and no file written."""
    as_trained = load("eval_as_trained")
    evaluated = []
    monkeypatch.setattr(as_trained, "evaluate", lambda *args: evaluated.append(args) or FIGURES)
    runs = []
    for name, seed in layout.items():
        run = tmp_path / name
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({**FIGURES, "seed": seed}))
        (run / "last.pth.tar").write_bytes(b"")
        (run / "args.yaml").write_text("mix: mergemix\nmerge_num: 4\n")
        runs.append(run)
    res = tmp_path / "res"
    for flag in ("--runs", "--baselines"):
        argv = ["--runs", *map(str, runs)] if flag == "--runs" else ["--runs", str(runs[0]), "--baselines", *map(str, runs)]
        assert as_trained.main([*argv, "--name", "as", "--results-dir", str(res)]) == 2
        assert error_line(capsys) == (f"error: {runs[0]} and {runs[1]} are runs of one row 'fast', {why}: give the "
                                      "runs of one recipe, or evaluate each folder's runs under their own --name")
    assert evaluated == [] and files_under(res) == []
