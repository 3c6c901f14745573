"""The MergeMix training objective: losses, gradients, passes, state_dict compatibility."""
import pytest
import timm
import torch
import torch.nn.functional as F
from test_tome import cls_attention_direct

import mergemix.mix as mix
from mergemix import mask as M
from mergemix.mix import sample_lam
from mergemix.mix.mergemix import default_readout_block
from mergemix.mix import mixed_targets, smooth_one_hot, soft_cross_entropy
from mergemix.tome import forward_readout, tome_options


def tiny_vit(**changes):
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3, "num_classes": 10}
    return timm.create_model("deit_tiny_patch16_224", **{**kwargs, **changes})


def batch(B=6):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)


@pytest.mark.parametrize("aux", ["clean", "mixup", "none"])
@pytest.mark.parametrize("policy", ["area", "gaussian"])
def test_finite_loss_and_outputs(aux, policy):
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss=aux, lam_policy=policy, generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.x_mixed.shape == x.shape and out.mask.shape == (6, 1, 32, 32)
    assert out.lam_hat.shape == (6,) and out.scores.shape == (6, 16)
    L = 16
    assert torch.equal(out.mask[:, 0, ::8, ::8].flatten(1).sum(1), torch.floor(out.lam * L))
    # the images are the mask's: own pixels where it is 1, the partner's where it is 0
    assert torch.equal(out.x_mixed, torch.where(out.mask.bool(), x, x[out.partner]))
    if policy == "area":
        assert torch.allclose(out.lam_hat, out.mask.mean((1, 2, 3)))
    else:  # the step's draws replayed: partners, λ, then the gaussian label of Step 3
        replay = torch.Generator().manual_seed(0)
        M.derangement(6, replay)
        lam = sample_lam(1.0, replay)  # (the mixup loss draws its own after the label)
        tokens = out.extras["readout"].attn.shape[1] - 1  # patch tokens at the read-out block
        expected = M.lam_hat_gaussian(M.keep_count(lam, L, 6), tokens, L, replay)
        assert out.lam == pytest.approx(lam) and torch.equal(out.lam_hat, expected)
        assert not torch.allclose(out.lam_hat, out.mask.mean((1, 2, 3)))  # not the area label
    assert (out.partner != torch.arange(6)).all()


def kept_patches(out, patch=8):
    """(B, L) 0/1 patch mask read back from the step's pixel mask (one pixel per patch)."""
    return out.mask[:, 0, ::patch, ::patch].flatten(1).bool()


def assert_keeps_highest(scores, keep):
    """Every kept patch scores at least as high as every dropped one (ties allowed)."""
    L = scores.shape[1]
    n = int(keep[0].sum())
    assert 0 < n < L and (keep.sum(1) == n).all()  # the check below needs kept and dropped patches
    kept_min = scores.masked_fill(~keep, float("inf")).min(1).values
    dropped_max = scores.masked_fill(keep, float("-inf")).max(1).values
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("aux", ["clean", "none"])
def test_mask_keeps_patches_with_highest_timm_cls_attention(aux):
    """With no merge before the read-out block, the step's scores are the CLS-row attention of
    that block computed from timm's own unpatched modules, and the mask keeps the top ones."""
    plain = tiny_vit()
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss=aux, r=[0, 0, 3, 3], readout_block=2,
                     generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    with torch.no_grad():
        direct = cls_attention_direct(plain, x, 2)[:, 1:]  # drop the CLS key: patches only
    assert torch.allclose(out.scores, direct, atol=1e-6)
    assert_keeps_highest(direct, kept_patches(out))


def test_mask_of_non_square_images_and_patches_covers_the_patch_each_score_is_for():
    """(24, 40) images in (4, 8) patches, a 6 x 5 grid: the mask keeps the patches of the highest
    timm CLS attention, each covering its own 4 x 8 pixels in row-major grid order (a grid or patch
    taken the other way round would put the scores on other pixels)."""
    plain, model = tiny_vit(img_size=(24, 40), patch_size=(4, 8)), tiny_vit(img_size=(24, 40), patch_size=(4, 8))
    obj = mix.create("mergemix", 10, r=[0, 0, 3, 3], readout_block=2, generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 24, 40, generator=g), torch.randint(0, 10, (6,), generator=g)
    out = obj(model, x, y)
    with torch.no_grad():
        direct = cls_attention_direct(plain, x, 2)[:, 1:]
    assert torch.allclose(out.scores, direct, atol=1e-6)
    keep = out.mask[:, 0, ::4, ::8].flatten(1).bool()  # (6, 30): one pixel per patch
    assert_keeps_highest(direct, keep)
    by_hand = keep.float().view(6, 1, 6, 5).repeat_interleave(4, dim=2).repeat_interleave(8, dim=3)
    assert torch.equal(out.mask, by_hand)


def test_mask_keeps_patches_with_highest_recovered_attention_when_merged():
    """With merges before the read-out block, each patch scores the read-out attention of the
    token holding it (Sᵀ·A, written here as an einsum) and the mask keeps the top ones."""
    model = tiny_vit()
    obj = mix.create("mergemix", 10, r=[3, 3, 2, 0], readout_block=2, generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    out = obj(model, *batch())
    ro = out.extras["readout"]
    assert ro.attn.shape == (6, 17 - 6)  # really merged before the read-out
    expected = torch.einsum("bkl,bk->bl", ro.source, ro.attn)
    assert torch.allclose(out.scores, expected)
    assert_keeps_highest(expected, kept_patches(out))


@pytest.mark.parametrize("policy", ["area", "gaussian"])
def test_mixup_aux_loss_recomputed(policy):
    """aux_loss='mixup': total = soft CE on the MergeMix batch + soft CE on a plain MixUp batch
    (lerp of the images and of the label-smoothed one-hot targets), recomputed from scratch."""
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="mixup", lam_policy=policy, generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    lam, partner = out.extras["mixup_lam"], out.extras["mixup_partner"]
    assert 0 < lam < 1 and (partner != torch.arange(6)).all()

    def soft_ce(logits, t):
        return -(t * F.log_softmax(logits, -1)).sum(-1).mean()

    t = F.one_hot(y, 10).float() * 0.9 + 0.1 / 10  # timm's label smoothing 0.1
    with torch.no_grad(), tome_options(model, merge=True):
        mixed_logits = model(out.x_mixed)
        mixup_logits = model(torch.lerp(x[partner], x, lam))
    mergemix_loss = soft_ce(mixed_logits, torch.lerp(t[out.partner], t, out.lam_hat[:, None]))
    mixup_loss = soft_ce(mixup_logits, torch.lerp(t[partner], t, lam))
    assert torch.allclose(out.logits, mixed_logits, atol=1e-5)
    assert torch.allclose(out.loss, mergemix_loss + mixup_loss, atol=1e-5)


def test_gradients_only_through_training_forwards():
    """Recomputing the loss from the step's own mixed images and labels gives the same gradients,
    so nothing flows back through the mask construction."""
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="clean", generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    assert not out.scores.requires_grad and not out.mask.requires_grad and not out.x_mixed.requires_grad
    out.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with tome_options(model, merge=True):
        clean = model(x)
        mixed = model(out.x_mixed)
    ref = (soft_cross_entropy(mixed, mixed_targets(y, out.partner, out.lam_hat, 10, 0.1))
           + soft_cross_entropy(clean, smooth_one_hot(y, 10, 0.1)))
    assert torch.allclose(ref, out.loss, atol=1e-6)
    ref.backward()
    for a, p in zip(got, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_none_mode_mask_pass_has_no_graph_and_stops_early():
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="none", readout_block=1)
    obj.prepare(model)
    calls = {i: [] for i in range(4)}
    for i, blk in enumerate(model.blocks):
        blk.norm1.register_forward_pre_hook(lambda mod, args, i=i: calls[i].append(torch.is_grad_enabled()))
    mlp_calls = []
    model.blocks[1].mlp.register_forward_pre_hook(lambda mod, args: mlp_calls.append(torch.is_grad_enabled()))
    x, y = batch()
    out = obj(model, x, y)
    # mask pass: blocks 0 and 1 without grad, stopping after block 1's attention;
    # the mixed pass runs every block with grad
    assert calls[0] == [False, True] and calls[1] == [False, True]
    assert calls[2] == [True] and calls[3] == [True]
    assert mlp_calls == [True]
    assert out.extras["readout"].attn.grad_fn is None
    out.loss.backward()
    # the only loss is the mixed one
    ref = soft_cross_entropy(out.logits, mixed_targets(y, out.partner, out.lam_hat, 10, 0.1))
    assert torch.allclose(ref, out.loss)


def test_merge_train_off_runs_full_length_mixed_forward():
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="none", merge_train=False)
    obj.prepare(model)
    seen = []
    model.blocks[-1].norm1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    obj(model, *batch())
    assert seen == [17]  # 16 patches + CLS: no merging in the training forward


def test_merge_every_merges_the_same_total_in_fewer_blocks():
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="none", merge_every=2)
    obj.prepare(model)
    seen = []
    for blk in model.blocks:
        blk.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    obj(model, *batch())
    # default merge_num 8 (half of 16 patches) in blocks 0 and 2, weights 1.5 and 0.5: 6 then 2.
    # Tokens reaching each MLP: read-out pass (stops in block 2 = ⌊0.75·4⌋ − 1) 11, 11; then the
    # training forward 11, 11, 9, 9 (17 tokens, 6 merged in block 0, 2 more in block 2)
    assert model.tome.r == [6, 0, 2, 0] and seen == [11, 11, 11, 11, 9, 9]
    assert obj.defaults()["merge_every"] == 2


def test_prepared_model_outside_a_step_is_plain_timm():
    plain = tiny_vit().eval()
    model = tiny_vit().eval()
    mix.create("mergemix", 10).prepare(model)
    x, _ = batch()
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)


def test_state_dict_keys_unchanged_and_loadable():
    plain = tiny_vit()
    model = tiny_vit()
    mix.create("mergemix", 10).prepare(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())


def test_prepare_resolves_the_model_dependent_defaults():
    """read-out block ⌊0.75·depth⌋ − 1 and merge_num half the patches, of the model prepared."""
    obj = mix.create("mergemix", 10)
    obj.prepare(tiny_vit())  # depth 4, 16 patches
    assert (obj.readout_block, obj.merge_num) == (2, 8)
    deeper = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=8, embed_dim=48,
                               num_heads=3, num_classes=10)
    obj = mix.create("mergemix", 10)
    obj.prepare(deeper)  # depth 8, 64 patches
    assert (obj.readout_block, obj.merge_num) == (5, 32)
    obj.prepare(deeper)  # again: the same settings
    assert (obj.readout_block, obj.merge_num) == (5, 32)
    # a model that fails leaves them as given (its merge_num was half its own patches)
    obj = mix.create("mergemix", 10, readout_block=7)
    with pytest.raises(ValueError, match="read-out block 7 is out of range"):
        obj.prepare(tiny_vit())
    assert (obj.readout_block, obj.merge_num) == (7, None)


@pytest.mark.parametrize("aux", ["clean", "mixup", "none"])
def test_an_unprepared_model_is_told_to_prepare(aux):
    # patch_tome alone sets no read-out block, so the step would fail again further in: name prepare()
    with pytest.raises(ValueError, match=r"call objective\.prepare\(model\) first"):
        mix.create("mergemix", 10, aux_loss=aux)(tiny_vit(), *batch())


@pytest.mark.parametrize("aux", ["clean", "none"])
def test_a_batch_of_one_fails_before_any_forward(aux):
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss=aux)
    obj.prepare(model)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="at least 2"):
        obj(model, *batch(1))
    assert calls == []


def test_hybrid_vit_masks_whole_tokens_of_its_backbone_stride():
    """A ResNet stem (stride 16) under 8x8 patches: each token covers 32x32 pixels."""
    from mergemix.tome import patch_size

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224", img_size=128, depth=2, num_classes=10)
    obj = mix.create("mergemix", 10, readout_block=1, alpha=0.5)
    obj.prepare(model)
    assert patch_size(model) == (32, 32) and model.patch_embed.patch_size == (8, 8)
    x, y = torch.randn(4, 3, 128, 128), torch.randint(0, 10, (4,))
    out = obj(model, x, y)
    assert out.mask.shape == (4, 1, 128, 128)
    blocks = out.mask.reshape(4, 4, 32, 4, 32)  # (B, gh, 32, gw, 32): constant inside each token's square
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))
    assert torch.allclose(out.mask.mean(dim=(1, 2, 3)), out.lam_hat)


def test_a_readout_before_any_merge_gets_a_note():
    obj = mix.create("mergemix", 10, readout_block=0)
    obj.prepare(tiny_vit())
    assert obj.notes() and "comes before any merge" in obj.notes()[0]
    default = mix.create("mergemix", 10)
    default.prepare(tiny_vit())  # read-out at block 2, after the merges of blocks 0 and 1
    assert default.notes() == [] and mix.create("cutmix", 10).notes() == []


def test_bias_free_training_on_mixed_images_only_gets_a_note_on_how_to_evaluate():
    """aux none without the bias trains on bias-free merged forwards only: the note names the eval
    command with this run's merging; with the clean pass, the bias, or an unmerged training forward, none."""
    fast = mix.create("mergemix", 10, aux_loss="none", prop_attn=False, merge_every=2, merge_num=6)
    fast.prepare(tiny_vit())
    assert len(fast.notes()) == 1 and fast.notes()[0].endswith("--merge-num 6 --merge-every 2 --no-prop-attn")
    for options in ({"aux_loss": "clean", "prop_attn": False}, {"aux_loss": "none", "prop_attn": True},
                    {"aux_loss": "none", "prop_attn": False, "merge_train": False}):
        other = mix.create("mergemix", 10, merge_num=6, **options)
        other.prepare(tiny_vit())
        assert other.notes() == [], options


def test_same_seed_same_step():
    outs = []
    for _ in range(2):
        model = tiny_vit()
        obj = mix.create("mergemix", 10, lam_policy="gaussian", generator=torch.Generator().manual_seed(7))
        obj.prepare(model)
        outs.append(obj(model, *batch()))
    assert torch.equal(outs[0].x_mixed, outs[1].x_mixed) and torch.equal(outs[0].lam_hat, outs[1].lam_hat)


def test_mixing_off_is_plain_ce():
    model = tiny_vit()
    obj = mix.create("mergemix", 10)
    obj.prepare(model)
    obj.mixup_enabled = False
    x, y = batch()
    out = obj(model, x, y)
    assert out.x_mixed is None
    assert torch.allclose(out.loss, soft_cross_entropy(out.logits, smooth_one_hot(y, 10, 0.1)))


@pytest.mark.parametrize("aux, merge_train, tokens", [("clean", False, 10), ("clean", True, 10), ("none", True, 10),
                                                      ("none", False, 17)])
def test_mixing_off_trains_the_forward_mixed_steps_train(aux, merge_train, tokens):
    # the clean pass of aux_loss clean merges whatever merge_train says: so does the step with mixing off
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss=aux, merge_train=merge_train)
    obj.prepare(model)
    obj.mixup_enabled = False
    seen = []
    model.blocks[-1].norm1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    obj(model, *batch())
    # tokens entering the last block: 16 patches + CLS unmerged; merged 17 − (3 + 2 + 2) by the default schedule
    assert model.tome.r == [3, 2, 2, 1] and seen == [tokens]


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="lam_policy"):
        mix.create("mergemix", 10, lam_policy="linear")
    with pytest.raises(ValueError, match="aux_loss"):
        mix.create("mergemix", 10, aux_loss="both")
    with pytest.raises(ValueError, match="VisionTransformer"):
        mix.create("mergemix", 10).prepare(torch.nn.Linear(4, 4))
    obj = mix.create("mergemix", 10)
    model = tiny_vit()
    obj.prepare(model)
    with pytest.raises(ValueError, match="at least 2"):
        obj(model, *batch(1))


def compile_counting_graphs(model: torch.nn.Module) -> tuple[torch.nn.Module, list]:
    """``torch.compile`` with a backend that runs each traced graph as it is and records it."""
    traced: list = []

    def counting_backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    return torch.compile(model, backend=counting_backend), traced


@pytest.mark.parametrize("merge_train, graphs", [(True, 1), (False, 2)])
def test_compiled_clean_step_traces_one_graph_for_both_passes(merge_train, graphs):
    """With merging on in training, the mixed pass repeats the clean pass's settings, so
    torch.compile traces (and compiles) the model once per step shape, not twice."""
    torch._dynamo.reset()
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="clean", merge_train=merge_train,
                     generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    compiled, traced = compile_counting_graphs(model)
    x, y = batch()
    for _ in range(2):
        out = obj(compiled, x, y)
        out.loss.backward()
    assert len(traced) == graphs
    with torch.no_grad(), tome_options(model, merge=True, readout=True):
        model(x)  # eager, on the clean images
    # the step's mask came from the clean pass's read-out, not from the mixed pass's
    assert torch.allclose(out.extras["readout"].attn, model.tome_readout.attn, atol=1e-6)
    torch._dynamo.reset()


def test_compiled_none_step_compiles_the_readout_pass_too():
    """aux_loss='none' takes its mask from a partial forward; it goes through the compiled
    wrapper, so both the read-out pass and the training pass are traced, and the read-out
    equals the eager one."""
    torch._dynamo.reset()
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="none", generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    compiled, traced = compile_counting_graphs(model)
    x, y = batch()
    out = obj(compiled, x, y)
    out.loss.backward()
    assert len(traced) == 2  # the partial read-out forward and the training forward
    with torch.no_grad(), tome_options(model, merge=True):
        eager = forward_readout(model, x)
    assert torch.allclose(out.extras["readout"].attn, eager.attn, atol=1e-6)
    assert torch.equal(out.extras["readout"].index, eager.index)
    assert not model.tome.readout_only  # the switch is restored after the partial pass
    torch._dynamo.reset()


def test_mask_follows_the_input_size_of_a_dynamic_size_model():
    """With dynamic_img_size, a 48 px batch on a model configured for 32 px has 6x6 patches: the
    mask covers the whole image and keeps exactly ⌊λ·36⌋ of them."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=48,
                              num_heads=3, num_classes=10, dynamic_img_size=True)
    obj = mix.create("mergemix", 10, merge_num=12, generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    x, y = torch.randn(6, 3, 48, 48), torch.randint(0, 10, (6,))
    out = obj(model, x, y)
    assert out.mask.shape == (6, 1, 48, 48) and out.scores.shape == (6, 36)
    assert torch.equal(kept_patches(out).sum(1), torch.floor(out.lam * 36).long())


def test_area_label_of_images_padded_to_whole_patches_is_the_kept_pixel_share():
    """30x22 px under 8 px patches (dynamic_img_pad): a 4x3 grid whose last row and column hold
    fewer real pixels, so the share of patches kept is not the share of the image."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=48,
                              num_heads=3, num_classes=10, dynamic_img_size=True, dynamic_img_pad=True)
    obj = mix.create("mergemix", 10, merge_num=4, generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    out = obj(model, torch.randn(6, 3, 30, 22), torch.randint(0, 10, (6,)))
    assert out.mask.shape == (6, 1, 30, 22)
    torch.testing.assert_close(out.lam_hat, out.mask.mean(dim=(1, 2, 3)))
    assert not torch.allclose(out.lam_hat, out.lam_hat[:1].expand(6))  # the patch share would be equal for all


def test_one_device_data_parallel_trains_as_the_bare_model_and_several_devices_are_refused():
    """A model prepared, then wrapped in nn.DataParallel (on CPU: no devices, it calls the module) takes
    the same step as the bare model; over several devices its replicas would drop the read-out."""
    x, y = batch()
    losses = []
    for wrap in (False, True):
        model = tiny_vit()
        obj = mix.create("mergemix", 10, generator=torch.Generator().manual_seed(0))
        obj.prepare(model)
        losses.append(obj(torch.nn.DataParallel(model) if wrap else model, x, y).loss)
    assert torch.equal(losses[0], losses[1])
    wrapped = torch.nn.DataParallel(tiny_vit())
    wrapped.device_ids = [0, 1]  # as on a 2-GPU machine
    with pytest.raises(ValueError, match="DataParallel over 2 devices is not supported.*DistributedDataParallel"):
        mix.create("mergemix", 10).prepare(wrapped)


def test_method_defaults():
    """DESIGN §2.1: proportional attention on by default; §2.3: read-out block ⌊0.75·depth⌋ − 1."""
    model = tiny_vit()
    mix.create("mergemix", 10).prepare(model)
    assert model.tome.prop_attn is True
    # by hand: ⌊0.75·2⌋ − 1 = 0, ⌊0.75·10⌋ − 1 = 6 (rounding 7.5 would give 7), ⌊0.75·24⌋ − 1 = 17; depth 1 clamps to 0
    assert [default_readout_block(d) for d in (1, 2, 4, 10, 12, 24)] == [0, 0, 2, 6, 8, 17]


@pytest.mark.parametrize("aux", ["clean", "none"])
def test_mask_comes_from_the_merged_sequence_when_training_unmerged(aux):
    """merge_train=False unmerges only the training forward: the mask is still read out on the
    ToMe-merged sequence (17 − 3 − 3 tokens enter block 2) and recovered through its source matrix."""
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss=aux, merge_train=False, r=[3, 3, 2, 0], readout_block=2,
                     generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    out = obj(model, *batch())
    ro = out.extras["readout"]
    assert ro.attn.shape == (6, 17 - 6) and (ro.size > 1).any()
    assert torch.allclose(out.scores, torch.einsum("bkl,bk->bl", ro.source, ro.attn))


def test_mixup_aux_loss_draws_its_own_partners_and_lambda():
    """aux_loss='mixup' adds a plain MixUp(0.8) batch with its own derangement and λ, drawn after
    MergeMix's partner and λ (replayed from the same seed), not MergeMix's partner reused."""
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="mixup", generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    out = obj(model, *batch())
    replay = torch.Generator().manual_seed(0)
    partner = M.derangement(6, replay)
    sample_lam(1.0, replay)
    mix_partner = M.derangement(6, replay)
    assert torch.equal(out.partner, partner) and torch.equal(out.extras["mixup_partner"], mix_partner)
    assert out.extras["mixup_lam"] == pytest.approx(sample_lam(0.8, replay))
    assert not torch.equal(mix_partner, partner)  # this seed draws two different derangements


def test_clean_aux_step_reports_the_clean_pass_logits():
    """With aux_loss='clean' the step's logits are the clean forward's (base.StepOutput: MergeMix's clean
    pass where it runs one), recomputed here on the unmixed batch, not the mixed forward's."""
    model = tiny_vit()
    obj = mix.create("mergemix", 10, aux_loss="clean", generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    with torch.no_grad(), tome_options(model, merge=True):
        clean, mixed = model(x), model(out.x_mixed)
    assert torch.allclose(out.logits, clean, atol=1e-5)
    assert not torch.allclose(out.logits, mixed, atol=1e-3)


def test_gaussian_label_is_the_partners_when_the_mask_keeps_no_patch(monkeypatch):
    """λ = 0.06 on 16 patches keeps ⌊0.96⌋ = 0 of them: every image is all partner, and the gaussian
    λ̂ (whose min-max is undefined when nothing is kept, DESIGN §2.5) gives the own class weight 0."""
    import mergemix.mix.mergemix as mergemix_module

    monkeypatch.setattr(mergemix_module, "sample_lam", lambda alpha, generator: 0.06)
    model = tiny_vit()
    obj = mix.create("mergemix", 10, lam_policy="gaussian", generator=torch.Generator().manual_seed(0))
    obj.prepare(model)
    x, y = batch()
    out = obj(model, x, y)
    assert out.mask.sum() == 0 and torch.equal(out.x_mixed, x[out.partner])
    assert torch.equal(out.lam_hat, torch.zeros(6))
