"""The baseline objectives end to end on CPU with a tiny timm ViT: one step each, labels, seeds, errors."""
from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from test_tome import cls_attention_direct
from torch.utils._python_dispatch import TorchDispatchMode

from mergemix.mask import patch_fraction
from mergemix.mix import available, create
from mergemix.mix.attention import attention_mass
from mergemix.mix.base import smooth_one_hot

NUM_CLASSES = 10
IMAGE_FREE = ["mixup", "cutmix", "deit", "resizemix", "fmix", "saliencymix", "gridmix", "smoothmix"]
ATTENTION = ["transmix", "tokenmix", "smmix"]
BASELINES = IMAGE_FREE + ATTENTION
AREA_LABELLED = ["cutmix", "resizemix", "fmix", "gridmix", "saliencymix"]


def tiny_vit(**extra) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                             num_heads=2, num_classes=NUM_CLASSES, **extra)


def batch(B: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (B,), generator=g)


def objective(name: str, seed: int = 0, **options):
    return create(name, NUM_CLASSES, generator=torch.Generator().manual_seed(seed), **options)


def labelled_batch(B: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Image b is (b + 1)·10 + texture in [0, 1): a pixel's owner is x // 10 − 1, even after resizing."""
    texture = torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return (torch.arange(B).float() + 1).view(B, 1, 1, 1) * 10 + texture, torch.arange(B)


def test_every_baseline_is_registered_and_described():
    for name in BASELINES + ["none"]:
        assert name in available()
        obj = create(name, NUM_CLASSES)
        assert obj.description and obj.passes
        create(name, NUM_CLASSES, **obj.defaults())  # printed defaults are valid options
    assert create("smmix", NUM_CLASSES).passes == "1 no-grad partial fwd + 1 fwd + 1 bwd"


@pytest.mark.parametrize("name", BASELINES)
def test_one_step_forward_backward_finite(name):
    model = tiny_vit()
    obj = objective(name)
    obj.prepare(model)
    x, y = batch(B=5)  # odd batch
    out = obj(model, x, y)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # the loss really reaches the weights
    assert out.logits.shape == (5, NUM_CLASSES) and out.x_mixed.shape == x.shape
    assert out.mask.shape == (5, 1, 32, 32) and out.lam.shape == out.lam_hat.shape == (5,)
    assert ((out.lam_hat >= 0) & (out.lam_hat <= 1)).all()
    assert (out.partner != torch.arange(5)).all()


@pytest.mark.parametrize("name", BASELINES)
def test_same_seed_same_batch(name):
    model = tiny_vit()
    x, y = batch(B=4)
    outs = []
    for _ in range(2):
        obj = objective(name, seed=7)
        obj.prepare(model)
        outs.append([obj(model, x, y) for _ in range(3)])
    for a, b in zip(*outs):
        assert torch.equal(a.x_mixed, b.x_mixed) and torch.equal(a.lam_hat, b.lam_hat)
        assert torch.equal(a.partner, b.partner) and torch.equal(a.loss, b.loss)
    other = objective(name, seed=8)
    other.prepare(model)
    assert not torch.equal(other(model, x, y).x_mixed, outs[0][0].x_mixed)


@pytest.mark.parametrize("name", BASELINES)
def test_batch_of_one_is_a_clear_error(name):
    model = tiny_vit()
    obj = objective(name)
    obj.prepare(model)
    x, y = batch(B=1)
    with pytest.raises(ValueError, match="at least 2"):
        obj(model, x, y)


@pytest.mark.parametrize("name", BASELINES + ["none", "mergemix"])
def test_inputs_a_custom_loop_gets_wrong_are_refused_by_name(name):
    """Mistakes that torch reports deep inside (or, for a one-logit model, not at all) get a ValueError
    that says what is wrong: labels not (B,) class indices, images not (B, C, H, W), classes that differ."""
    model, x, y = tiny_vit(), *batch(B=4)
    obj = objective(name)
    obj.prepare(model)
    for bad_y, words in [(F.one_hot(y, NUM_CLASSES).float(), "integer class indices"),
                         (y[:, None], "integer class indices"), (y[:3], "integer class indices"),
                         (y.float(), "integer class indices"), (torch.full_like(y, NUM_CLASSES), r"in \[0, 10\)")]:
        with pytest.raises(ValueError, match=words):
            obj(model, x, bad_y)
    with pytest.raises(ValueError, match="a batch of float images"):
        obj(model, x[0], y)
    if hasattr(obj, "mixer"):  # timm's contract too: an unbatched image is not three images
        with pytest.raises(ValueError, match="a batch of float images"):
            obj.mixer(x[0], y[:3])
    # one logit would broadcast into a zero loss; 0: no head, the forward gives 32 features
    for outputs, width in ((1, 1), (0, 32), (1000, 1000)):
        other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                                  num_heads=2, num_classes=outputs)
        other_obj = objective(name)
        other_obj.prepare(other)
        with pytest.raises(ValueError, match=rf"logits of shape \(4, {width}\) but the targets are \(4, 10\)"):
            other_obj(other, x, y)
    # a head replaced by hand (fine-tuning): its outputs count, not the num_classes attribute left at 1000
    other.head = nn.Linear(32, NUM_CLASSES)
    other_obj = objective(name)
    other_obj.prepare(other)
    assert torch.isfinite(other_obj(other, x, y).loss)
    for num_classes in (0, True, 10.0):
        with pytest.raises(ValueError, match="num_classes must be a whole number"):
            create(name, num_classes)


def test_soft_cross_entropy_refuses_logits_and_targets_of_other_shapes():
    from mergemix.mix import soft_cross_entropy
    targets = smooth_one_hot(torch.tensor([0, 1]), NUM_CLASSES, 0.1)
    with pytest.raises(ValueError, match=r"logits of shape \(2, 1\) but the targets are \(2, 10\)"):
        soft_cross_entropy(torch.zeros(2, 1, requires_grad=True), targets)


@pytest.mark.parametrize("name", BASELINES)
def test_mixing_switched_off_is_the_clean_step(name):
    model = tiny_vit()
    obj = objective(name)
    obj.prepare(model)
    obj.mixup_enabled = False
    x, y = batch(B=1)  # no partner needed
    out = obj(model, x, y)
    assert out.x_mixed is None
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y, label_smoothing=0.1))  # torch's own CE


@pytest.mark.parametrize("name", BASELINES)
def test_prob_zero_leaves_the_batch_unmixed(name):
    model = tiny_vit()
    obj = objective(name, prob=0.0)
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    assert torch.equal(out.x_mixed, x) and out.lam_hat.eq(1).all() and out.extras["kind"] == "none"
    one = obj(model, x[:1], y[:1])  # never mixing, it needs no partner: a batch of one will do
    assert torch.equal(one.x_mixed, x[:1]) and one.extras["kind"] == "none"


@pytest.mark.parametrize("name", IMAGE_FREE)
def test_timm_mixer_contract(name):
    x, y = batch(B=4)
    obj = objective(name)
    mixup_fn = obj.mixer  # used as timm's train.py uses its Mixup
    x_mixed, targets = mixup_fn(x, y)
    assert x_mixed.shape == x.shape and targets.shape == (4, NUM_CLASSES)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets.min() >= 0.1 / NUM_CLASSES - 1e-7  # label smoothing folded in
    assert mixup_fn.mixup_enabled
    mixup_fn.mixup_enabled = False  # what timm's train.py does at --mixup-off-epoch: the mixer's own flag
    assert not obj.mixup_enabled and not obj.mixer.mixup_enabled
    x_off, t_off = mixup_fn(x, y)
    assert x_off is x and torch.equal(t_off, smooth_one_hot(y, NUM_CLASSES, 0.1))
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, NUM_CLASSES))
    assert obj(linear, x, y).x_mixed is None  # the objective's own step stops mixing too (its clean step)


@pytest.mark.parametrize("name", AREA_LABELLED)
def test_label_mass_equals_pixel_area(name):
    x, y = labelled_batch()
    for seed in range(6):
        x_mixed, targets = objective(name, seed=seed, smoothing=0.0).mixer(x, y)
        owner = (x_mixed // 10).long() - 1  # (B, 3, H, W)
        assert (owner == owner[:, :1]).all()
        owner = owner[:, 0].flatten(1)
        own_area = (owner == y[:, None]).float().mean(1)
        torch.testing.assert_close(targets[y, y], own_area)
        for b in range(len(y)):
            others = owner[b][owner[b] != b].unique()
            assert len(others) <= 1  # one partner per image
            if len(others):
                assert targets[b, others[0]].item() == pytest.approx(1 - own_area[b].item(), abs=1e-6)


def test_smmix_label_mass_equals_pixel_area():
    model = tiny_vit()
    obj = objective("smmix", smoothing=0.0)
    obj.prepare(model)
    x, y = labelled_batch()
    for _ in range(4):
        out = obj(model, x, y)
        own = ((out.x_mixed // 10).long() - 1)[:, 0] == y[:, None, None]
        torch.testing.assert_close(out.lam_hat, own.float().mean((1, 2)))


def test_smoothmix_labels_by_soft_area_and_blends():
    x, y = batch(B=4)
    obj = objective("smoothmix", smoothing=0.0)
    mixed = obj.mix(x)
    torch.testing.assert_close(mixed.lam_hat, mixed.mask.mean((1, 2, 3)))
    torch.testing.assert_close(mixed.x, mixed.mask * x + (1 - mixed.mask) * x[mixed.partner])


def test_deit_switches_between_mixup_and_cutmix():
    x, _ = batch(B=4)
    kinds = [objective("deit", seed=s).mix(x).kind for s in range(40)]
    assert 5 < kinds.count("cutmix") < 35 and kinds.count("mixup") + kinds.count("cutmix") == 40
    assert {objective("deit", seed=s, mixup_alpha=0.0).mix(x).kind for s in range(5)} == {"cutmix"}
    assert {objective("deit", seed=s, switch_prob=0.0).mix(x).kind for s in range(5)} == {"mixup"}


def test_transmix_labels_by_attention_of_the_same_forward():
    model = tiny_vit()
    obj = objective("transmix", switch_prob=1.0)
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    # timm's own attention of the last block, on the mixed images, from an unpatched twin
    attn = cls_attention_direct(tiny_vit(), out.x_mixed, 1)[:, 1:]
    torch.testing.assert_close(out.lam_hat, attention_mass(attn, patch_fraction(out.mask, (4, 4))))
    assert not torch.allclose(out.lam_hat, out.mask.mean((1, 2, 3)))  # not the area label
    # the attention the labels came from, for figures
    torch.testing.assert_close(out.scores, attn)
    assert out.extras["scores_of"] == "mixed"


def test_transmix_keeps_lambda_for_mixup_batches():
    model = tiny_vit()
    obj = objective("transmix", switch_prob=0.0)
    obj.prepare(model)
    out = obj(model, *batch())
    assert out.extras["kind"] == "mixup" and torch.equal(out.lam_hat, out.lam)


def test_tokenmix_mixes_whole_tokens_and_labels_by_attention():
    model = tiny_vit()
    obj = objective("tokenmix")
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    patches = out.mask.view(5, 1, 4, 8, 4, 8)
    assert (patches.amax(dim=(3, 5)) == patches.amin(dim=(3, 5))).all()  # constant within each patch
    keep = out.mask[:, 0, ::8, ::8].flatten(1)
    attn = cls_attention_direct(tiny_vit(), out.x_mixed, 1)[:, 1:]  # timm's, last block, mixed images
    torch.testing.assert_close(out.lam_hat, attention_mass(attn, keep))
    torch.testing.assert_close(out.scores, attn)
    assert out.extras["scores_of"] == "mixed"


def test_tokenmix_gives_the_partner_floor_of_1_minus_lambda_tokens_at_most(monkeypatch):
    """λ = 0.34 on 10x10 patches: ⌊0.66·100⌋ = 66 partner tokens (1 − 0.34 is 0.65999… in floats)."""
    import mergemix.mix.tokenmix as tokenmix

    monkeypatch.setattr(tokenmix, "sample_lam", lambda alpha, generator: 0.34)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=40, patch_size=4, depth=2, embed_dim=32,
                              num_heads=2, num_classes=NUM_CLASSES)
    obj = objective("tokenmix", min_block=1)
    obj.prepare(model)
    x = torch.randn(8, 3, 40, 40)
    partner_tokens = (1 - obj.mix(x).mask[:, 0, ::4, ::4]).flatten(1).sum(1)
    assert partner_tokens.max() == 66 and partner_tokens.min() >= 60


def test_smmix_reads_attention_of_the_clean_batch():
    model = tiny_vit()
    obj = objective("smmix")
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    # timm's own attention of the last block on the clean images, from an unpatched twin
    torch.testing.assert_close(out.scores, cls_attention_direct(tiny_vit(), x, 1)[:, 1:])
    assert out.extras["scores_of"] == "original"


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_methods_refuse_models_that_are_not_vits(name):
    with pytest.raises(ValueError, match="VisionTransformer"):
        objective(name).prepare(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, NUM_CLASSES)))


@pytest.mark.parametrize("name", ["none", "cutmix", "mergemix"] + ATTENTION)
def test_a_distilled_deit_in_distillation_training_is_a_clear_error(name):
    """Its forward returns two heads' logits; without the check the loss failed on a tuple."""
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                              num_heads=2, num_classes=NUM_CLASSES)
    model.set_distilled_training(True)
    with pytest.raises(ValueError, match=r"call model.set_distilled_training\(False\)"):
        objective(name).prepare(model)
    model.set_distilled_training(False)  # the heads averaged: one logits tensor, and a step trains
    obj = objective(name)
    obj.prepare(model)
    x, y = batch(B=4)
    obj(model.train(), x, y).loss.backward()


def test_bad_options_are_clear_errors():
    with pytest.raises(TypeError, match="alpha"):
        create("smoothmix", NUM_CLASSES, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        create("cutmix", NUM_CLASSES, alpha=0.0)
    with pytest.raises(ValueError, match="prob"):
        create("fmix", NUM_CLASSES, prob=1.5)
    with pytest.raises(ValueError, match="scope"):
        create("resizemix", NUM_CLASSES, scope=(0.5, 0.2))
    with pytest.raises(ValueError, match="cutmix_alpha"):
        create("deit", NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(TypeError):
        create("mixup", NUM_CLASSES, not_an_option=1)
    with pytest.raises(RuntimeError, match="prepare"):
        objective("tokenmix")(tiny_vit(), *batch())


def test_tokenmix_draws_on_the_grid_of_the_input_size():
    """dynamic_img_size: the token blocks are drawn on the 6x6 grid of a 48 px batch, not the
    configured 4x4 one, so the mask covers the image and stays constant within each patch."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=48,
                              num_heads=3, num_classes=NUM_CLASSES, dynamic_img_size=True)
    obj = objective("tokenmix")
    obj.prepare(model)
    out = obj(model, torch.randn(5, 3, 48, 48), torch.randint(0, NUM_CLASSES, (5,)))
    patches = out.mask.view(5, 1, 6, 8, 6, 8)
    assert out.mask.shape == (5, 1, 48, 48)
    assert (patches.amax(dim=(3, 5)) == patches.amin(dim=(3, 5))).all()


def another(value):
    """A valid value of an option other than its default ``value`` (None: the option is left out)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, tuple):
        return tuple(another(v) for v in value)
    return {"area": "gaussian", "clean": "mixup", "cls_row": "cls_col"}.get(value)


def test_every_option_a_method_takes_is_listed_with_the_value_it_was_given():
    """`mergemix methods` and train's log print defaults(): it must name every option the constructor
    accepts, each with the value it was given (here every option at a value other than its default)."""
    for name in available():
        defaults = create(name, NUM_CLASSES).defaults()
        given = {k: another(v) for k, v in defaults.items() if another(v) is not None}
        assert given and all(given[k] != defaults[k] for k in given), name
        assert create(name, NUM_CLASSES, **given).defaults() == {**defaults, **given}, name


# DESIGN §2.7: OpenMixup's defaults for CIFAR-100 DeiT, and timm's DeiT recipe (MixUp 0.8 / CutMix 1.0, 50/50)
OPENMIXUP_DEFAULTS = {
    "mixup": {"alpha": 0.8},
    "cutmix": {"alpha": 2.0},
    "deit": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5},
    "fmix": {"alpha": 1.0},
    "saliencymix": {"alpha": 0.2},
    "gridmix": {"alpha": 1.0},
    "resizemix": {"alpha": 1.0, "scope": (0.1, 0.8)},
    "transmix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.8},
    "mergemix": {"mixup_alpha": 0.8},  # its mixup auxiliary, as the reference code's
}


@pytest.mark.parametrize("name", list(OPENMIXUP_DEFAULTS))
def test_default_options_are_those_of_the_spec(name):
    defaults = create(name, NUM_CLASSES).defaults()
    assert {k: defaults[k] for k in OPENMIXUP_DEFAULTS[name]} == OPENMIXUP_DEFAULTS[name]
    assert defaults["smoothing"] == 0.1  # the library's label smoothing, as timm's Mixup (DESIGN §2.6)


class HostTraffic(TorchDispatchMode):
    """Records what would make the CPU wait for an accelerator: blocking copies from the host to
    it, and values read back from it. The meta device stands in for the GPU (it has no data, so a
    read-back fails outright)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if (name == "_to_copy" and args[0].device.type == "cpu" and kwargs.get("device") is not None
                and kwargs["device"].type == "meta" and not kwargs.get("non_blocking", False)):
            self.events.append(f"blocking copy of {tuple(args[0].shape)}")
        if name == "copy_" and args[1].device.type == "cpu" and args[0].device.type == "meta" and not args[2:]:
            self.events.append(f"blocking copy_ of {tuple(args[1].shape)}")
        if name == "_local_scalar_dense" and args[0].device.type != "cpu":
            self.events.append("a value read back")
        return func(*args, **kwargs)


# every method with its defaults, and MergeMix's other code paths
EVERY_STEP = [*[(n, {}) for n in available()], ("mergemix", {"aux_loss": "none"}), ("mergemix", {"aux_loss": "mixup"}),
              ("mergemix", {"lam_policy": "gaussian"})]


@pytest.mark.parametrize("name, options", EVERY_STEP)
def test_a_training_step_never_makes_the_cpu_wait_for_the_gpu(name, options, monkeypatch):
    """Partners, boxes and λ are drawn on the CPU; each goes to the GPU as a non-blocking copy, and
    nothing comes back. A blocking copy would stop the CPU at every step until the GPU had run all
    queued work (no launching ahead), which on a GPU costs every method a share of each step.
    ``torch.tensor``/``torch.as_tensor`` of host data for the device copy blocking, out of the dispatcher's sight."""
    traffic = HostTraffic()

    def watch(make):
        def made(data, *args, **kwargs):
            if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta" \
                    and not (isinstance(data, torch.Tensor) and data.device.type == "meta"):
                traffic.events.append(f"torch.{make.__name__} of host data")
            return make(data, *args, **kwargs)
        return made

    monkeypatch.setattr(torch, "tensor", watch(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", watch(torch.as_tensor))
    obj = create(name, NUM_CLASSES, **options)  # no generator: fmix would make one on the device, which meta is not
    model = obj.prepare(tiny_vit()).to("meta")
    x, y = (t.to("meta") for t in batch(4))
    with traffic:
        out = obj(model, x, y)
        out.loss.backward()
    assert out.loss.device.type == "meta" and traffic.events == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, options", EVERY_STEP)
def test_a_training_step_on_a_gpu_never_synchronises(name, options):
    """The same as the meta-device test above, on a real GPU: CUDA's sync debug mode raises at any
    call that would make the CPU wait (after one step, so that one-time set-up is not counted)."""
    obj = create(name, NUM_CLASSES, generator=torch.Generator().manual_seed(0), **options)
    model = obj.prepare(tiny_vit()).cuda()
    x, y = (t.cuda() for t in batch(4))
    obj(model, x, y).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = obj(model, x, y)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


@pytest.mark.parametrize("name", BASELINES + ["mergemix", "none"])
def test_an_objective_serves_the_one_model_it_prepared(name):
    """Its settings (read-out block, merge schedule, patch grid) are the prepared model's: a second
    model is refused, the same model (or its wrapper) again is not, and a model that failed to
    prepare leaves the objective free."""
    obj, model = objective(name), tiny_vit()
    if name in ATTENTION + ["mergemix"]:
        pooled = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                                   num_heads=2, num_classes=NUM_CLASSES, class_token=False, global_pool="avg")
        with pytest.raises(ValueError, match="class token"):
            obj.prepare(pooled)
    assert obj.prepare(model) is model
    obj.prepare(torch.compile(model))  # a wrapper of the same model (compiled lazily: nothing runs)
    with pytest.raises(ValueError, match=f"this {name} objective is already prepared for another model"):
        obj.prepare(tiny_vit())
    copied = copy.deepcopy(obj)  # a copy (or pickle) is free, to be prepared on a copy of the model
    assert copied.prepared_model is None and pickle.loads(pickle.dumps(obj)).prepared_model is None
    assert torch.isfinite(obj(model, *batch()).loss)


@pytest.mark.parametrize("name", ["cutmix", "transmix", "mergemix"])
def test_labels_of_any_integer_dtype_train_as_int64_and_images_must_be_float(name):
    """uint8 labels (from numpy) gave torch's scatter error; the step is the int64 labels' step."""
    model, (x, y) = tiny_vit(), batch(6)
    losses = []
    for labels in (y, y.to(torch.uint8), y.int()):
        obj = objective(name, seed=3)
        obj.prepare(model)
        losses.append(obj(model, x, labels).loss)
    assert losses[0] == losses[1] == losses[2]
    assert torch.equal(objective("cutmix", seed=1).mixer(x, y.to(torch.uint8))[1], objective("cutmix", seed=1).mixer(x, y)[1])
    with pytest.raises(ValueError, match="expected a batch of float images"):
        obj(model, x.to(torch.uint8), y)


def test_create_names_the_option_it_does_not_take():
    with pytest.raises(TypeError, match=r"mixup has no option mixup_alpha \(did you mean alpha\?\); its options: "
                                        r"alpha, prob, smoothing"):
        create("mixup", NUM_CLASSES, mixup_alpha=1.0)
    with pytest.raises(TypeError, match=r"mergemix has no option merge_nums \(did you mean merge_num\?\)"):
        create("mergemix", NUM_CLASSES, merge_nums=8)


@pytest.mark.parametrize("name", ["transmix", "mergemix"])
def test_a_step_refuses_a_model_patched_again_or_another_model(name):
    """Another objective's prepare() or patch_tome() replaces the model's merging settings (MergeMix
    then trained unmerged with the other read-out block, without a word): the step says so. A method
    that patches nothing (CutMix) takes any model, a wrapper unwrap() does not know included."""
    from mergemix.tome import patch_tome

    model, xy = tiny_vit(), batch()
    cutmix = objective("cutmix")
    cutmix.prepare(model)
    obj = objective(name)
    obj.prepare(model)
    with pytest.raises(ValueError, match=f"this {name} objective was prepared for another model"):
        obj(tiny_vit(), *xy)
    assert torch.isfinite(cutmix(nn.Sequential(model), *xy).loss)
    patch_tome(model, merge_num=4)
    with pytest.raises(ValueError, match=f"patched again after this {name} objective prepared it"):
        obj(model, *xy)
    obj.prepare(model)  # prepared again: its own settings back
    assert torch.isfinite(obj(model, *xy).loss)


def test_attention_methods_score_the_patch_tokens_of_a_model_with_registers():
    """With two register tokens after CLS (3 prefix tokens), the scores and TransMix's labels are timm's
    CLS attention over the 16 patch tokens only: the prefix tokens' columns are left out."""
    model = tiny_vit(reg_tokens=2)
    assert model.num_prefix_tokens == 3
    obj = objective("transmix", switch_prob=1.0)
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    attn = cls_attention_direct(tiny_vit(reg_tokens=2), out.x_mixed, 1)[:, 3:]
    torch.testing.assert_close(out.scores, attn)
    torch.testing.assert_close(out.lam_hat, attention_mass(attn, patch_fraction(out.mask, (4, 4))))


def test_transmix_label_of_images_padded_to_whole_patches_counts_real_pixels_only():
    """30x22 px under 8 px patches (dynamic_img_pad): a 4x3 grid whose last row and column are partly
    padding. A patch's kept share is over its real pixels (a slice of the mask clips to them)."""
    model = tiny_vit(dynamic_img_size=True, dynamic_img_pad=True)
    obj = objective("transmix", switch_prob=1.0)
    obj.prepare(model)
    x, y = torch.randn(5, 3, 30, 22, generator=torch.Generator().manual_seed(3)), torch.arange(5)
    out = obj(model, x, y)
    kept = torch.stack([out.mask[:, 0, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8].mean((1, 2))
                        for i in range(4) for j in range(3)], dim=1)  # (B, 12)
    attn = cls_attention_direct(tiny_vit(dynamic_img_size=True, dynamic_img_pad=True), out.x_mixed, 1)[:, 1:]
    torch.testing.assert_close(out.lam_hat, attention_mass(attn, kept))
