"""Flag parsing: YAML recipes as defaults, flags on top, clear errors for bad recipes."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergemix import config
from mergemix.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    return config.parse_train_args(["--experiment", "x", *argv])


def test_flags_override_recipe_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nlr: 1e-3\nbatch-size: 16\nmodel_kwargs: {depth: 3}\n")
    args = parse("-c", str(recipe), "--epochs", "3")
    assert args.epochs == 3  # flag wins
    assert args.lr == pytest.approx(1e-3) and isinstance(args.lr, float)  # YAML's "1e-3" string coerced
    assert args.batch_size == 16  # dashes accepted in keys
    assert args.model_kwargs == {**config.DEFAULT_MODEL_KWARGS, "depth": 3}  # the digits ViT, 3 blocks deep
    assert args.weight_decay == config.build_train_parser().get_default("weight_decay")
    # list flags (timm's --decay-milestones, --opt-betas) take YAML lists, or one number
    recipe.write_text("decay_milestones: [30, 60]\nopt_betas: [0.9, '0.95']\n")
    assert (parse("-c", str(recipe)).decay_milestones, parse("-c", str(recipe)).opt_betas) == ([30, 60], [0.9, 0.95])
    recipe.write_text("decay_milestones: 30\n")
    assert parse("-c", str(recipe)).decay_milestones == [30]


def test_digits_recipe_is_the_default():
    keys = ("experiment", "config")
    default = {k: v for k, v in vars(parse()).items() if k not in keys}
    recipe = {k: v for k, v in vars(parse("-c", str(REPO / "configs/digits.yaml"))).items() if k not in keys}
    assert recipe == default


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_recipe_parses(name):
    args = parse("-c", str(REPO / "configs" / name))
    assert args.dataset in config.DATASETS


def test_cifar_recipe_is_the_papers():
    args = parse("-c", str(REPO / "configs/cifar100_deit_s.yaml"))
    assert (args.img_size, args.batch_size, args.opt, args.lr, args.weight_decay, args.sched) == (
        224, 100, "adamw", 1e-3, 0.05, "cosine")
    assert (args.epochs, args.warmup_epochs, args.aa, args.drop_path, args.smoothing) == (
        200, 20, "rand-m7-mstd0.5-inc1", 0.1, 0.1)
    assert (args.merge_num, args.readout_block, args.clip_grad) == (98, 8, 5.0)


def test_default_model_kwargs_belong_to_the_default_model():
    assert parse().model_kwargs == config.DEFAULT_MODEL_KWARGS
    assert parse("--model", "vit_small_patch16_224").model_kwargs == {}
    # given alone, --model-kwargs change the digits ViT's kwargs (a named model starts from none)
    assert parse("--model-kwargs", "depth=2", "attn_drop_rate=0.1", "qkv_bias=false").model_kwargs == {
        "patch_size": 4, "embed_dim": 96, "depth": 2, "num_heads": 3, "attn_drop_rate": 0.1, "qkv_bias": False}
    assert parse("--model", "vit_small_patch16_224", "--model-kwargs", "depth=2").model_kwargs == {"depth": 2}


def test_model_kwargs_with_a_recipe_change_the_recipes_model_key_by_key():
    """-c digits.yaml --model-kwargs depth=2 is the digits ViT 2 blocks deep, as without -c; it used to
    drop the recipe's patch_size, embed_dim and num_heads (a 1-patch, 192-wide ViT)."""
    digits = str(REPO / "configs" / "digits.yaml")
    expected = {"patch_size": 4, "embed_dim": 96, "depth": 2, "num_heads": 3}
    assert parse("-c", digits, "--model-kwargs", "depth=2").model_kwargs == expected
    assert parse("--model-kwargs", "depth=2").model_kwargs == expected
    assert parse("-c", digits).model_kwargs == config.DEFAULT_MODEL_KWARGS
    # a model named on the command line takes only the kwargs given with it
    assert parse("-c", digits, "--model", "vit_small_patch16_224", "--model-kwargs", "depth=2").model_kwargs == {
        "depth": 2}


def test_model_kwargs_given_twice_take_both_uses_items():
    """argparse keeps a list flag's last use: depth=2 would be lost and depth 4 trained. Every command
    takes every use's items instead, a later key winning, as --model-kwargs does over a recipe's."""
    from mergemix.evaluate import build_eval_parser
    from mergemix.viz import build_parser as build_viz_parser

    args = parse("--model-kwargs", "depth=2", "embed_dim=64", "--model-kwargs=embed_dim=32", "--model-kwargs", "num_heads=2")
    assert args.model_kwargs == {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    twice = ["--model-kwargs", "depth=2", "--model-kwargs", "drop_rate=0.5"]
    assert build_eval_parser().parse_args(["--checkpoint", "x", *twice]).model_kwargs == [("depth", 2), ("drop_rate", 0.5)]
    assert build_viz_parser().parse_args(twice).model_kwargs == [("depth", 2), ("drop_rate", 0.5)]


def test_model_kwargs_at_a_resume_change_the_resumed_models_key_by_key(tmp_path):
    """As eval and viz take them: a non-architectural kwarg (attn_drop_rate) must not drop the saved ones."""
    import torch

    ckpt = tmp_path / "last.pth.tar"
    torch.save({"state_dict": {}, "args": {"model": "vit_small_patch16_224", "model_kwargs": {"depth": 2, "embed_dim": 64}}},
               ckpt)
    assert parse("--resume", str(ckpt)).model_kwargs == {"depth": 2, "embed_dim": 64}
    assert parse("--resume", str(ckpt), "--model-kwargs", "attn_drop_rate=0.1").model_kwargs == {
        "depth": 2, "embed_dim": 64, "attn_drop_rate": 0.1}
    # a model named anew starts from its own kwargs
    assert parse("--resume", str(ckpt), "--model", "vit_small_patch16_224",
                 "--model-kwargs", "attn_drop_rate=0.1").model_kwargs == {"attn_drop_rate": 0.1}
    # a recipe naming the resumed model without kwargs keeps the resumed kwargs; null keys are left out
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vit_small_patch16_224\nlr: null\n")
    resumed = parse("--resume", str(ckpt), "-c", str(recipe))
    assert resumed.model_kwargs == {"depth": 2, "embed_dim": 64}



def test_a_recipe_beats_the_resumed_checkpoints_args_and_flags_beat_both(tmp_path):
    """README's precedence: defaults < the resumed checkpoint's args < `-c` recipe < command-line
    flags. The checkpoint trained 3 epochs at lr 0.5, the recipe asks for 5 epochs: 5; --epochs 7: 7;
    the lr the recipe leaves out stays the checkpoint's."""
    import torch

    ckpt = tmp_path / "last.pth.tar"
    torch.save({"state_dict": {}, "args": {"epochs": 3, "lr": 0.5}}, ckpt)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 5\n")
    assert parse("--resume", str(ckpt)).epochs == 3
    layered = parse("--resume", str(ckpt), "-c", str(recipe))
    assert (layered.epochs, layered.lr) == (5, 0.5)
    assert parse("--resume", str(ckpt), "-c", str(recipe), "--epochs", "7").epochs == 7


def test_a_resume_trains_on_in_the_folder_a_recipe_names(tmp_path):
    """--resume continues in the checkpoint's own folder unless --output/--experiment name another,
    and a recipe naming one counts as well as a flag: `experiment: fork` trains on in <output>/fork
    (the output the run was saved with), `output: DIR` in DIR/<the run's saved experiment name>.
    Neither is the folder the checkpoint lives in, where a resume without them trains on."""
    import torch

    run = tmp_path / "runs" / "orig"
    run.mkdir(parents=True)
    ckpt = run / "last.pth.tar"
    torch.save({"state_dict": {}, "args": {"output": str(tmp_path / "runs"), "experiment": "orig"}}, ckpt)
    resumed = config.parse_train_args(["--resume", str(run)])
    assert (resumed.output, resumed.experiment) == (str(tmp_path / "runs"), "orig")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("experiment: fork\n")
    forked = config.parse_train_args(["--resume", str(run), "-c", str(recipe)])
    assert (forked.output, forked.experiment) == (str(tmp_path / "runs"), "fork")
    recipe.write_text(f"output: {tmp_path / 'elsewhere'}\n")
    moved = config.parse_train_args(["--resume", str(run), "-c", str(recipe)])
    assert (moved.output, moved.experiment) == (str(tmp_path / "elsewhere"), "orig")

@pytest.mark.parametrize("text, fragment", [
    ("epochs: 3\nbatch_sise: 4\n", "batch_sise (did you mean batch_size?)"),
    ("epochs: [3\n", "invalid YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("epochs: many\n", "epochs must be of type int"),
    ("decay_milestones: [30, 6.5]\n", "decay_milestones must be of type int, got 6.5"),
    ("amp: 1\n", "amp must be true or false"),
    ("lam_policy: uniform\n", "lam_policy must be one of"),
    ("resume: /some/run\n", "a recipe cannot resume a run (key resume); pass --resume on the command line"),
    ("model_kwargs: [1, 2]\n", "model_kwargs must be a mapping or a list of key=value"),
    ("model_kwargs: [abc]\n", "model_kwargs must be a mapping or a list of key=value"),
    # argparse would split a text into ('depth', 2), reported as a garbled tuple
    ("model_kwargs: depth=2\n", "bad.yaml: model_kwargs must be a mapping, e.g. {depth: 6, embed_dim: 96}, got 'depth=2'"),
    ("mix_opt: [[a]]\n", "mix_opt must be a mapping or a list of key=value"),
    ("experiment: [a]\n", "experiment must be a word, got ['a']"),
    ("opt: {adamw: 1}\n", "opt must be a word, got {'adamw': 1}"),
    ("opt_betas: []\n", "opt_betas needs at least one value, got []"),
    ("batch_size: 16\nbatch-size: 8\n", "batch_size given twice (with - and with _): keep one"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, fragment):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        parse("-c", str(recipe))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_null_in_a_recipe_is_the_flags_default_and_a_number_may_name_a_run(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: null\nepochs: null\nmodel: null\nexperiment: 12345\nmerge_train: null\n")
    args, defaults = config.parse_train_args(["-c", str(recipe)]), parse()
    assert (args.lr, args.epochs, args.model, args.merge_train) == (defaults.lr, defaults.epochs, defaults.model, None)
    assert args.experiment == "12345" and args.model_kwargs == config.DEFAULT_MODEL_KWARGS  # as if no model key


def test_seed_must_fit_torchs_generators():
    with pytest.raises(ConfigError, match="--seed must be in"):
        config.check_limits(parse("--seed", str(2**64)))
    config.check_limits(parse("--seed", str(2**62)))


def test_a_method_flag_and_mix_opt_of_other_values_are_refused(tmp_path):
    """Neither may win silently: before, --mix-opt did, even a recipe's over a flag typed now."""
    with pytest.raises(ConfigError, match="--mix-alpha 0.5 and --mix-opt alpha=2 both set alpha: give one"):
        config.method_options(parse("--mix-alpha", "0.5", "--mix-opt", "alpha=2"), accepted={"alpha"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mix_opt: {merge_train: false}\n")
    with pytest.raises(ConfigError, match="--merge-train True and --mix-opt merge_train=False both set"):
        config.method_options(parse("-c", str(recipe), "--merge-train"), accepted={"merge_train"})
    same = parse("--mix-alpha", "2", "--mix-opt", "alpha=2")
    assert config.method_options(same, accepted={"alpha"})[0] == {"alpha": 2.0}
    # a flag at its default sets nothing: --mix-opt smoothing=0.1 trains at 0.1 as before
    assert config.method_options(parse("--mix-opt", "smoothing=0.1"), accepted={"smoothing"})[0] == {"smoothing": 0.1}
    with pytest.raises(ConfigError, match="--mixup 0.4 and --mix-opt alpha=0.8 both set alpha"):  # the flag typed
        config.method_options(parse("--mix", "mixup", "--mixup", "0.4", "--mix-opt", "alpha=0.8"), accepted={"alpha"})


def test_missing_recipe_and_bad_flags():
    with pytest.raises(ConfigError, match="cannot read config"):
        parse("-c", "/nonexistent/recipe.yaml")
    with pytest.raises(ConfigError, match="invalid choice"):
        parse("--dataset", "mnist")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse("--mix-opt", "alpha")


def test_method_options_pass_only_what_the_method_takes():
    args = parse("--merge-num", "4", "--mix-alpha", "0.5", "--mix-opt", "r=2")
    used, unused = config.method_options(args, accepted={"alpha", "merge_num", "smoothing"})
    assert used == {"alpha": 0.5, "merge_num": 4, "smoothing": 0.0, "r": 2}  # --mix-opt always passed
    assert unused == {}
    used, unused = config.method_options(args, accepted={"alpha", "smoothing"})
    assert "merge_num" not in used and unused == {"merge_num": 4}


def test_timm_mixup_and_cutmix_flags_set_the_alpha_of_the_method_of_that_name():
    """timm: --mixup 0.2 is MixUp's α. For --mix mixup it used to be dropped with a note."""
    for method, flag in (("mixup", "--mixup"), ("cutmix", "--cutmix")):
        used, unused = config.method_options(parse("--mix", method, flag, "0.3"), accepted={"alpha", "smoothing"})
        assert used["alpha"] == 0.3 and unused == {}
        same = parse("--mix", method, flag, "0.3", "--mix-alpha", "0.3")
        assert config.method_options(same, accepted={"alpha"})[0] == {"alpha": 0.3}
        with pytest.raises(ConfigError, match=f"--mix-alpha 0.5 and {flag} 0.3 both set"):
            config.method_options(parse("--mix", method, flag, "0.3", "--mix-alpha", "0.5"), accepted={"alpha"})
    # the DeiT recipe takes both, each under its own name
    used, _ = config.method_options(parse("--mix", "deit", "--mixup", "0.3", "--cutmix", "0.7"),
                                    accepted={"mixup_alpha", "cutmix_alpha"})
    assert used == {"mixup_alpha": 0.3, "cutmix_alpha": 0.7}


def test_timm_mixing_probability_flags_reach_the_method():
    """timm's --mixup-prob and --mixup-switch-prob (DESIGN §2.9) set the method's prob and switch_prob."""
    from mergemix import mix

    args = parse("--mix", "deit", "--mixup-prob", "0.3", "--mixup-switch-prob", "0.9")
    used, unused = config.method_options(args, accepted=set(mix.accepted_options(mix.get_class("deit"))))
    objective = mix.create("deit", 10, **used)
    assert (objective.prob, objective.switch_prob, unused) == (0.3, 0.9, {})


def test_parse_value():
    assert [config.parse_value(t) for t in ("4", "0.5", "1e-3", "true", "[1, 2]", "null", "none", "cls_row")] == [
        4, 0.5, 1e-3, True, [1, 2], None, "none", "cls_row"]
    # a method option whose value is the word none reaches the method as that word
    assert parse("--mix-opt", "aux_loss=none").mix_opt == {"aux_loss": "none"}


def test_compile_mode_implies_compile():
    assert not parse().compile and parse().compile_mode is None
    args = parse("--compile-mode", "reduce-overhead")
    assert args.compile and args.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="invalid choice"):
        parse("--compile-mode", "fastest")


@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "--workers must be at least 0 (0: load in the main process), got -1"),
    (["--img-size", "-4"], "--img-size must be at least 1, got -4"),
    (["--img-size", "0"], "--img-size must be at least 1, got 0"),
    (["--drop-path", "5"], "--drop-path must be in [0, 1), got 5.0"),
    (["--mixup-off-epoch", "-1"], "--mixup-off-epoch must be at least 0 (0: never), got -1"),
    (["--train-subset", "0"], "--train-subset must be at least 1, got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1, got 0"),
    (["--eval-interval", "0"], "--eval-interval must be at least 1, got 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be at least 0, got -1"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
])
def test_out_of_range_flags_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError) as err:
        parse(*flags)
    assert str(err.value) == message


def test_plateau_steps_per_epoch():
    """timm's plateau schedule waits for an evaluation: per update, create_scheduler_v2 asserts."""
    assert not parse().sched_on_epochs
    assert parse("--sched", "plateau").sched_on_epochs


def test_out_of_range_recipe_values_are_checked_too(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("workers: -2\n")
    with pytest.raises(ConfigError, match="--workers must be at least 0"):
        parse("-c", str(recipe))


def test_a_runs_args_yaml_is_a_recipe_for_a_new_run(tmp_path):
    args = parse("--mix-opt", "r=1", "--epochs", "3", "--output", str(tmp_path))
    saved = config.recipe(args)
    assert not {"config", "resume", "experiment"} & set(saved) and saved["output"] == str(tmp_path)
    recipe = tmp_path / "args.yaml"
    recipe.write_text(yaml.safe_dump(saved, sort_keys=False))
    again = config.parse_train_args(["-c", str(recipe)])
    assert {k: v for k, v in vars(again).items() if k not in ("config", "experiment")} == {
        k: v for k, v in vars(args).items() if k not in ("config", "experiment")}
    assert again.experiment != "x"  # a new run folder name
    # --mix-opt on top of a recipe's (or a checkpoint's) mapping adds to it
    assert parse("-c", str(recipe), "--mix-opt", "alpha=0.5").mix_opt == {"r": 1, "alpha": 0.5}
    # an args.yaml written before run folders were left out of it holds config: null: still a recipe
    saved.update(config=None, experiment="old")
    recipe.write_text(yaml.safe_dump(saved))
    assert config.parse_train_args(["-c", str(recipe)]).experiment == "old"
    recipe.write_text("config: other.yaml\n")
    with pytest.raises(ConfigError, match="cannot load another recipe"):
        parse("-c", str(recipe))


def test_a_recipe_that_is_not_text_is_one_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="is not a UTF-8 text file"):
        parse("-c", str(recipe))


def test_bundled_recipes_by_name_from_any_folder(tmp_path, monkeypatch):
    """After a pip install there is no configs/ folder at hand: -c takes a recipe's name."""
    assert set(config.bundled_recipes()) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    by_path = vars(parse("-c", str(REPO / "configs" / "fashion_mnist.yaml")))
    monkeypatch.chdir(tmp_path)
    for name in ("fashion_mnist", "fashion_mnist.yaml"):
        assert {**vars(parse("-c", name)), "config": None} == {**by_path, "config": None}
    # a folder of that name is not a recipe; a file of the working folder (name, else name.yaml) comes first
    (tmp_path / "digits").mkdir()
    assert parse("-c", "digits").epochs == 40
    (tmp_path / "fashion_mnist.yaml").write_text("epochs: 4\n")
    assert parse("-c", "fashion_mnist").epochs == 4 and parse("-c", "fashion_mnist.yaml").epochs == 4
    (tmp_path / "fashion_mnist").write_text("epochs: 3\n")
    assert parse("-c", "fashion_mnist").epochs == 3
    # a name that is neither says which names there are; a path (a folder in it, or ./) is never taken for a name
    for missing in ("fashion", "configs/fashion_mnist.yaml", "./cifar100_deit_s"):
        with pytest.raises(ConfigError, match="no such file; the bundled recipes are cifar100_deit_s, digits, "
                                              "fashion_mnist, imagenet_deit_s"):
            parse("-c", missing)


def test_every_package_and_recipe_is_in_the_distribution():
    """pyproject lists the packages by hand (configs/ is mapped in as mergemix.configs): a new subpackage
    left out of that list would be missing from a wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"mergemix.configs"}
    assert setuptools["package-dir"]["mergemix.configs"] == "configs"
    assert setuptools["package-data"]["mergemix.configs"] == ["*.yaml"]
