"""Bad input to the profiling benchmarks (merge_profile, train_profile, prop_attn_variants,
sdpa_bias) fails at once with one line and exit code 2, and writes no output file."""
from __future__ import annotations

import json

import pytest
import torch

from benchmark_scripts import load

TINY = ["--model", "test_vit", "--img-size", "32", "--batch-size", "1", "--reps", "1", "--no-compile"]


@pytest.fixture(scope="module")
def scripts():
    return {name: load(name) for name in ("merge_profile", "train_profile", "prop_attn_variants", "sdpa_bias")}


def rejected_at_parsing(script, argv: list[str], capsys) -> str:
    """The usage error argparse prints for ``argv`` (exit code 2)."""
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def rejected_after_parsing(script, argv: list[str], capsys) -> str:
    """The one ``error: ...`` line ``main`` prints for an input that needs the model (exit code 2)."""
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


BAD_FLAGS = [
    (["--reps", "0"], "must be at least 1, got 0"),
    (["--batch-size", "0"], "must be at least 1, got 0"),
    (["--merge-num", "-3"], "must be at least 0, got -3"),
    (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--device", "foo"], "unknown --device 'foo'"),
]


@pytest.mark.parametrize("name", ["merge_profile", "train_profile"])
@pytest.mark.parametrize("argv, message", BAD_FLAGS)
def test_profiles_reject_bad_flags(scripts, name, argv, message, tmp_path, capsys):
    out = tmp_path / "new" / "r.json"
    assert message in rejected_at_parsing(scripts[name], ["--out", str(out), *argv], capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("name", ["merge_profile", "train_profile", "prop_attn_variants", "sdpa_bias"])
@pytest.mark.parametrize("cuda", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_rejected(scripts, name, cuda, capsys):
    assert "no CUDA device is visible" in rejected_at_parsing(scripts[name], ["--device", cuda], capsys)


@pytest.mark.parametrize("name", ["merge_profile", "train_profile", "prop_attn_variants", "sdpa_bias"])
def test_out_must_be_a_writable_file(scripts, name, tmp_path, capsys):
    assert "is a folder" in rejected_at_parsing(scripts[name], ["--out", str(tmp_path)], capsys)
    assert "cannot write /proc/x.json" in rejected_at_parsing(scripts[name], ["--out", "/proc/x.json"], capsys)


def test_train_profile_rejects_an_unknown_compile_mode(scripts, capsys):
    assert "invalid choice: 'bogus'" in rejected_at_parsing(scripts["train_profile"], ["--compile-mode", "bogus"], capsys)
    assert "--compile-mode has no effect with --no-compile" in rejected_at_parsing(
        scripts["train_profile"], ["--compile-mode", "default", "--no-compile"], capsys)


def test_train_profile_rejects_a_merge_num_too_large_before_timing(scripts, tmp_path, capsys):
    out = tmp_path / "r.json"
    err = rejected_after_parsing(scripts["train_profile"], [*TINY, "--merge-num", "98", "--out", str(out)], capsys)
    assert "merge_num=98 is too large" in err  # 4 patches of 16 px at 32 px
    assert not out.exists()


def test_train_profile_rejects_a_model_that_is_no_vit(scripts, capsys):
    err = rejected_after_parsing(scripts["train_profile"], ["--model", "resnet18", "--img-size", "32"], capsys)
    assert "--model resnet18 is not a timm ViT" in err


def test_train_profile_writes_its_report_into_a_new_folder(scripts, tmp_path):
    out = tmp_path / "new" / "r.json"
    assert scripts["train_profile"].main([*TINY, "--merge-num", "1", "--rows", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["eager"]["ms"]) == {"plain", "merged", "merged_every2"} and "compiled" not in report


def test_merge_profile_rejects_what_the_model_cannot_take_before_timing(scripts, tmp_path, capsys):
    out = tmp_path / "r.json"
    merge_profile = scripts["merge_profile"]
    small = ["--model", "test_vit", "--batch-size", "1", "--reps", "1", "--no-compile", "--out", str(out)]
    assert "merge_num=500 is too large" in rejected_after_parsing(merge_profile, [*small, "--merge-num", "500"], capsys)
    err = rejected_after_parsing(merge_profile, [*small, "--merge-num", "4", "--readout-block", "6"], capsys)
    assert "read-out block 6 is out of range for a model with 6 blocks" in err
    assert not out.exists()


def test_merge_profile_reads_out_at_the_models_default_block(scripts, tmp_path):
    """test_vit has 6 blocks: the read-out block is the library's default for 6 (3), not DeiT-S's 8."""
    out = tmp_path / "new" / "r.json"
    assert scripts["merge_profile"].main(["--model", "test_vit", "--merge-num", "4", "--batch-size", "1",
                                          "--reps", "1", "--no-compile", "--out", str(out)]) == 0
    eager = json.loads(out.read_text())["eager_ms"]
    assert set(eager) == {"plain", "merged", "merged_every2", "merged_no_prop_attn", "merged_index_to_block_3"}


@pytest.mark.parametrize("name", ["prop_attn_variants", "sdpa_bias"])
def test_timing_on_the_cpu_is_rejected_up_front(scripts, name, tmp_path, capsys):
    out = tmp_path / "r.json"
    err = rejected_at_parsing(scripts[name], ["--device", "cpu", "--out", str(out)], capsys)
    assert "timing needs a CUDA device" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["prop_attn_variants", "sdpa_bias"])
def test_reps_must_be_positive(scripts, name, capsys):
    assert "must be at least 1, got 0" in rejected_at_parsing(scripts[name], ["--check", "--reps", "0"], capsys)


def test_prop_attn_variants_rejects_an_unknown_form_before_building(scripts, capsys):
    err = rejected_at_parsing(scripts["prop_attn_variants"], ["--forms", "mask", "bogus"], capsys)
    assert "invalid choice: 'bogus'" in err


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", ["prop_attn_variants", "sdpa_bias"])
def test_check_writes_its_result_to_out(scripts, name, tmp_path):
    out = tmp_path / "new" / "check.json"
    assert scripts[name].main(["--check", "--out", str(out)]) == 0
    diffs = json.loads(out.read_text())
    assert diffs and max(diffs.values()) < 1e-5
