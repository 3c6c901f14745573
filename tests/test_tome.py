"""Token merging and read-out checked against timm's own modules and hand computations."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerScale

from mergemix.mask import recover
from mergemix.merge import bipartite_matching, decreasing_schedule, merge_tokens, merged_positions, token_counts
from mergemix.tome import (_attention, configure_tome, forward_readout, patch_tome, resolve_schedule, tokens_per_block,
                           tome_options)

MODELS = {
    "deit": ("deit_tiny_patch16_224", {}),
    "layerscale": ("deit3_small_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_qknorm": ("vit_small_patch16_224", {"reg_tokens": 2, "qk_norm": True}),
    "pre_norm": ("vit_small_patch16_224", {"pre_norm": True}),  # CLIP-style: norm_pre before the blocks
    "non_square": ("vit_small_patch16_224", {"img_size": (24, 40), "patch_size": (4, 8)}),  # a 6x5 grid
}


def make(name: str, **extra) -> torch.nn.Module:
    arch, kw = MODELS[name]
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, **kw}
    model = timm.create_model(arch, depth=4, num_classes=5, **kw, **extra).eval()
    for mod in model.modules():  # deit3 starts LayerScale at 1e-6, which would hide the residual branches
        if isinstance(mod, LayerScale):
            torch.nn.init.uniform_(mod.gamma, 0.5, 1.5)
    return model


def images(model: torch.nn.Module, batch_size: int) -> torch.Tensor:
    """Random images of the size ``model`` was built for."""
    return torch.randn(batch_size, 3, *model.patch_embed.img_size)


def attention_probs(attn, t):
    """(B, heads, N, N) softmax attention of timm Attention ``attn`` on tokens ``t``, from its own modules."""
    B, N, _ = t.shape
    q, k, _ = attn.qkv(t).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)


def module_inputs(model, x, *modules):
    """The first input of each of ``modules`` during one no-grad ``model(x)``, captured by pre-hooks."""
    captured = {}
    hooks = [mod.register_forward_pre_hook(lambda _, args, i=i: captured.setdefault(i, args[0]))
             for i, mod in enumerate(modules)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [captured[i] for i in range(len(modules))]


def take(t, index):
    """Rows of t (B, K, C) at index (B, M): (B, M, C)."""
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def cls_attention_direct(model, x, block, score="cls_row"):
    """CLS attention of ``block`` over all tokens, computed from timm's own unpatched modules:
    the CLS query row (cls_row) or every query's attention to CLS (cls_col), head-averaged."""
    attn = model.blocks[block].attn
    probs = attention_probs(attn, module_inputs(model, x, attn)[0])
    return (probs[:, :, 0] if score == "cls_row" else probs[..., 0]).mean(1)


@pytest.mark.parametrize("name", list(MODELS))
def test_r0_equals_timm(name):
    model = make(name)
    x = images(model, 3)
    with torch.no_grad():
        ref = model(x)
        keys = list(model.state_dict())
        patch_tome(model, r=0, readout_block=2)
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert list(model.state_dict()) == keys
    # the read-out is a probability distribution over all K tokens
    assert torch.allclose(model.tome_readout.attn.sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_source_partitions_patches(name):
    model = make(name)
    npt, L = model.num_prefix_tokens, model.patch_embed.num_patches
    r = [3, 2, 2, 1]
    patch_tome(model, r, readout_block=2)
    with torch.no_grad():
        model(images(model, 4))
    ro = model.tome_readout
    K = npt + L - sum(r[:2])
    assert ro.attn.shape == (4, K) and ro.size.shape == (4, K) and ro.index.shape == (4, L)
    assert tokens_per_block(model)[2] == K
    S = ro.source
    assert S.shape == (4, K, L)
    assert torch.equal(S.sum(1), torch.ones(4, L))  # every patch in exactly one token
    assert torch.equal(S[:, :npt], torch.zeros(4, npt, L))  # prefix tokens hold no patch
    assert torch.equal(ro.size[:, npt:], S[:, npt:].sum(-1))  # size = member count
    assert torch.equal(ro.size[:, :npt], torch.ones(4, npt))


def test_merged_token_is_size_weighted_average_pure():
    torch.manual_seed(1)
    B, N, C, r = 2, 9, 4, 3
    x, metric = torch.randn(B, N, C), torch.randn(B, N, 6)
    size = torch.randint(1, 5, (B, N)).float()
    m = bipartite_matching(metric, r)
    merged, new_size = merge_tokens(x, size, m)
    pos = merged_positions(m)
    assert merged.shape == (B, N - r, C)
    for b in range(B):
        for k in range(N - r):
            members = (pos[b] == k).nonzero().flatten()
            w = size[b, members]
            assert new_size[b, k] == w.sum()
            assert torch.allclose(merged[b, k], (x[b, members] * w[:, None]).sum(0) / w.sum(), atol=1e-6)
    # prefix tokens pass through untouched, the patch tokens merge as without them
    prefix = torch.randn(B, 2, C)
    m_p = bipartite_matching(metric, r, num_prefix=2)
    with_prefix, size_p = merge_tokens(torch.cat([prefix, x], 1), torch.cat([torch.ones(B, 2), size], 1), m_p)
    assert torch.equal(with_prefix[:, :2], prefix) and torch.equal(size_p, torch.cat([torch.ones(B, 2), new_size], 1))
    assert torch.allclose(with_prefix[:, 2:], merged, atol=1e-6)
    assert torch.equal(merged_positions(m_p), torch.cat([torch.arange(2).expand(B, 2), pos + 2], 1))
    # the hand-written backward matches finite differences
    assert torch.autograd.gradcheck(lambda t: merge_tokens(t, size.double(), m)[0], x.double().requires_grad_())
    # bf16 tokens with float32 sizes (AMP): bf16 out and gradient, within bf16 rounding of float64
    g = torch.randn(B, N - r, C, dtype=torch.float64)
    x64, x16 = x.double().requires_grad_(), x.bfloat16().requires_grad_()
    (merge_tokens(x64, size.double(), m)[0] * g).sum().backward()
    out16 = merge_tokens(x16, size, m)[0]
    (out16 * g.bfloat16()).sum().backward()
    assert out16.dtype == x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), merged.double(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x16.grad.double(), x64.grad, rtol=2e-2, atol=2e-2)
    # the r best-matching A tokens are the merged ones (hand check of the matching rule)
    a = metric / metric.norm(dim=-1, keepdim=True)
    best = (a[:, ::2] @ a[:, 1::2].transpose(1, 2)).max(-1).values
    assert torch.equal(m.src.sort(1).values, 2 * best.topk(r, dim=1).indices.sort(1).values)


def test_matching_pairs_each_src_with_its_most_similar_b_token():
    # ToMe's rule by hand: A = even, B = odd patch positions; the r A tokens with the highest best
    # cosine similarity merge, each into the B token of largest cosine similarity to it
    torch.manual_seed(2)
    B, P, N, r = 3, 2, 11, 4
    metric = torch.randn(B, N, 5)
    m = bipartite_matching(metric, r, num_prefix=P)
    a_pos, b_pos = list(range(0, N, 2)), list(range(1, N, 2))  # patch indices (prefix excluded)
    for b in range(B):
        cos = {i: torch.stack([F.cosine_similarity(metric[b, i], metric[b, j], dim=0) for j in b_pos]) for i in a_pos}
        merged = sorted(a_pos, key=lambda i: cos[i].max().item(), reverse=True)[:r]
        assert sorted((m.src[b] - P).tolist()) == sorted(merged)
        for src, dst in zip(m.src[b].tolist(), m.dst[b].tolist()):
            assert m.keep[b, dst].item() == P + b_pos[cos[src - P].argmax().item()]


def test_merged_token_is_average_inside_model():
    """Tokens entering block 0's MLP are the mean of the timm residual stream over their members."""
    plain = make("deit")
    model = patch_tome(copy.deepcopy(plain), [4, 0, 0, 0], readout_block=1)
    x = torch.randn(2, 3, 32, 32)
    ref = module_inputs(plain, x, plain.blocks[0].norm2)[0]
    got = module_inputs(model, x, model.blocks[0].norm2)[0]
    S = model.tome_readout.source  # (B, K, L), valid at block 1 = right after block 0's merge
    expected = torch.cat([ref[:, :1], (S[:, 1:] @ ref[:, 1:]) / S[:, 1:].sum(-1, keepdim=True)], 1)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("score", ["cls_row", "cls_col"])
def test_proportional_attention_equals_duplicated_tokens(score):
    # exp(q·k + log s) = s·exp(q·k): attention with the log(size) bias over a token of size s equals
    # timm's plain attention over s identical copies of it (outputs and both CLS scores)
    attn = make("registers_qknorm").blocks[0].attn  # q/k-norm, 3 prefix tokens
    sizes = torch.tensor([[1, 1, 1, 3, 1, 2], [1, 1, 1, 1, 4, 1]])  # prefix tokens have size 1
    index = torch.stack([torch.arange(6).repeat_interleave(s) for s in sizes])  # (B, 9): token of each copy
    x = torch.randn(2, 6, attn.qkv.in_features)
    with torch.no_grad():
        out, scores, _ = _attention(attn, x, sizes.float().log()[:, None, None, :], score)
        ref_out = attn(take(x, index))
        probs = attention_probs(attn, take(x, index))
    assert torch.allclose(take(out, index), ref_out, atol=1e-5)
    if score == "cls_row":  # the CLS query's attention to a token = its attention summed over the copies
        assert torch.allclose(scores, torch.zeros(2, 6).scatter_add_(1, index, probs[:, :, 0].mean(1)), atol=1e-6)
    else:  # each copy's attention to CLS = the token's
        assert torch.allclose(scores.gather(1, index), probs[..., 0].mean(1), atol=1e-6)


@pytest.mark.parametrize("score, readout", [("cls_row", 1), ("cls_col", 1), ("cls_row", 2)])
def test_readout_after_merges_equals_timm_on_expanded_tokens(score, readout):
    """After a merge, the read-out block (proportional attention) equals timm's plain attention over
    the sequence in which every merged token is expanded back to one copy per patch it holds; also
    with a block that merges nothing in between (as ``merge_every`` schedules have)."""
    model = patch_tome(make("distilled"), [4, 0, 0, 0], readout_block=readout, score=score)
    blk, npt, x = model.blocks[readout], model.num_prefix_tokens, torch.randn(2, 3, 32, 32)
    t, h = module_inputs(model, x, blk.norm1, blk.ls1)  # merged stream entering the read-out block; attention output
    ro = model.tome_readout
    assert (ro.size[:, npt:] > 1).any()  # something did merge
    full = torch.cat([torch.arange(npt).expand(2, npt), ro.index], 1)  # token behind each original position
    with torch.no_grad():
        ref_h = blk.attn(blk.norm1(take(t, full)))
        probs = attention_probs(blk.attn, blk.norm1(take(t, full)))
    assert torch.allclose(take(h, full), ref_h, atol=1e-5)
    if score == "cls_row":
        ref = torch.zeros_like(ro.attn).scatter_add_(1, full, probs[:, :, 0].mean(1))
        assert torch.allclose(ro.attn, ref, atol=1e-6)
    else:
        assert torch.allclose(ro.attn.gather(1, full), probs[..., 0].mean(1), atol=1e-6)


@pytest.mark.parametrize("name,score", [("deit", "cls_row"), ("distilled", "cls_row"), ("distilled", "cls_col")])
def test_readout_aligned_with_timm_block(name, score):
    """Merging only after the read-out block: recovered scores = timm's own CLS attention there
    (the CLS query row, or the column of every query's attention to CLS)."""
    plain = make(name)
    x = torch.randn(3, 3, 32, 32)
    direct = cls_attention_direct(plain, x, 2, score)
    model = patch_tome(copy.deepcopy(plain), [0, 0, 3, 2], readout_block=2, score=score)
    with torch.no_grad():
        model(x)
    ro = model.tome_readout
    npt = model.num_prefix_tokens
    assert torch.allclose(ro.attn, direct, atol=1e-5)
    assert torch.allclose(recover(ro.attn, ro.source), direct[:, npt:], atol=1e-5)
    assert torch.allclose(recover(ro.attn, ro.index), direct[:, npt:], atol=1e-5)


@pytest.mark.parametrize("score, explicit", [("cls_row", (2, 3, 1, 15)), ("cls_col", (2, 3, 15, 15))])
def test_merged_forward_keeps_fused_attention_but_in_the_readout_block(monkeypatch, score, explicit):
    """DESIGN §2.1: proportional attention as SDPA's additive mask in every block; one explicit
    softmax, the read-out block's (cls_row: the CLS query row only; cls_col: its whole matrix instead
    of SDPA)."""
    model = patch_tome(make("deit"), [0, 2, 2, 2], readout_block=2, score=score)
    masks, softmaxed = [], []
    sdpa, softmax = F.scaled_dot_product_attention, torch.Tensor.softmax

    def recording_sdpa(q, k, v, attn_mask=None, **kw):
        masks.append(None if attn_mask is None else tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def recording_softmax(t, *args, **kw):
        softmaxed.append(tuple(t.shape))
        return softmax(t, *args, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(torch.Tensor, "softmax", recording_softmax)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # 17 tokens (CLS and 16 patches) enter blocks 0 and 1, 15 block 2, 13 block 3; sizes bias the keys
    # from the first merge (after block 1's attention) on
    fused = [None, None, (2, 1, 1, 15), (2, 1, 1, 13)]
    assert masks == (fused if score == "cls_row" else fused[:2] + fused[3:])
    assert softmaxed == [explicit]


def test_readout_source_ignores_later_merges():
    """The source must be the one at the read-out block, whatever later blocks merge (DESIGN §2.3)."""
    x = torch.randn(2, 3, 32, 32)
    a = patch_tome(make("deit"), [3, 2, 0, 0], readout_block=2)
    b = patch_tome(make("deit"), [3, 2, 3, 2], readout_block=2)
    with torch.no_grad():
        a(x)
        b(x)
    assert torch.equal(a.tome_readout.index, b.tome_readout.index)
    assert torch.allclose(a.tome_readout.attn, b.tome_readout.attn, atol=1e-6)
    ro = forward_readout(b, x)  # the partial pass gives the same read-out
    assert torch.allclose(ro.attn, b.tome_readout.attn, atol=1e-6)


def test_recovered_scores_constant_within_a_token():
    model = patch_tome(make("layerscale"), [3, 3, 0, 0], readout_block=2)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    ro = model.tome_readout
    scores = recover(ro.attn, ro.source)
    assert torch.allclose(scores, ro.attn.gather(1, ro.index))
    # each patch carries exactly its token's score: Sᵀ A, by hand
    for b in range(2):
        for l in range(scores.shape[1]):
            assert scores[b, l] == ro.attn[b, ro.index[b, l]]


def test_switch_merging_off_and_on():
    plain = make("deit")
    model = patch_tome(copy.deepcopy(plain), merge_num=8)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        merged = model(x)
        configure_tome(model, merge=False)
        off = model(x)
        configure_tome(model, merge=True)
        again = model(x)
        ref = plain(x)
    assert torch.allclose(off, ref, atol=1e-5)
    assert torch.allclose(merged, again)
    assert not torch.allclose(merged, ref, atol=1e-3)


def test_avg_pool_model_merges_with_weighted_mean():
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5,
                              global_pool="avg", class_token=False).eval()
    model = patch_tome(copy.deepcopy(plain), r=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)
    # merged: timm's avg pool is the plain mean over the L patches, so each final token counts once per
    # patch it holds (index: patch -> token after block 0's merge; block 1 merges nothing)
    torch.manual_seed(0)
    model = patch_tome(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5,
                                         global_pool="avg").eval(), r=[4, 0], readout_block=1)
    tokens, pooled = module_inputs(model, x, model.norm, model.fc_norm)
    assert (model.tome_readout.size > 1).any()
    assert torch.allclose(pooled, take(tokens, model.tome_readout.index).mean(1), atol=1e-5)


def test_merging_refuses_a_pooling_it_cannot_weight_even_when_reset_classifier_sets_it_later():
    """Max pooling over merged tokens is not the max over the patches: patch_tome refuses it, and a
    merged forward refuses it after reset_classifier; unmerged, the model stays timm's own."""
    def vit(global_pool):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5,
                                 global_pool=global_pool).eval()
    with pytest.raises(ValueError, match="not 'max'"):
        patch_tome(vit("max"), r=2)
    patch_tome(vit("max"), r=0)  # nothing merged: any pooling
    model, plain = patch_tome(vit("token"), r=2), vit("token")
    model.reset_classifier(5, "avgmax")
    plain.reset_classifier(5, "avgmax")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), pytest.raises(ValueError, match="not 'avgmax'"):
        model(x)
    configure_tome(model, merge=False)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-6)
    # no pooling at all returns the merged tokens, which is fine
    configure_tome(model, merge=True)
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(x).shape == (2, 17 - 2 * 2, 192)  # 16 patches + CLS, 2 merged in each of 2 blocks


def test_avg_pool_of_forward_features_is_size_weighted_too():
    """timm's idiom forward_head(forward_features(x)) gives forward(x), pre_logits included; with
    pool_include_prefix the prefix tokens join the mean once each, as in timm's own pooling."""
    x = torch.randn(2, 3, 32, 32)
    for include_prefix in (False, True):
        torch.manual_seed(0)
        model = patch_tome(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                             num_classes=5, global_pool="avg", reg_tokens=2,
                                             pool_include_prefix=include_prefix).eval(), r=[4, 0], readout_block=1)
        with torch.no_grad():
            logits = model(x)
            # forward keeps no sizes past the call (they would pin a CUDA-graph output), forward_features does
            assert model.tome_size is None and model.tome_readout is not None
            tokens = model.forward_features(x)
            assert model.tome_size.shape == (2, 16 - 4)
            assert torch.equal(model.forward_head(tokens), logits)
            pre = model.forward_head(tokens, pre_logits=True)
        ro, npt = model.tome_readout, model.num_prefix_tokens
        expanded = take(tokens, ro.index)  # one row per original patch
        if include_prefix:
            expanded = torch.cat([tokens[:, :npt], expanded], dim=1)
        assert (ro.size > 1).any() and torch.allclose(pre, model.fc_norm(expanded.mean(1)), atol=1e-5)


def test_token_sizes_stay_exact_in_a_bfloat16_model():
    """bfloat16 holds integers exactly only up to 256; one token here ends up holding 512 patches."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=128, patch_size=4, depth=4, embed_dim=48,
                              num_heads=3, num_classes=5).eval().bfloat16()
    patch_tome(model, r=[512, 256, 128, 64], readout_block=3)
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 128).bfloat16())
    ro = model.tome_readout
    assert ro.size.dtype == torch.float32 and ro.size[0, 1:].sum() == 1024
    assert torch.equal(ro.size, ro.source.sum(2) + (torch.arange(ro.size.shape[1]) == 0))


def test_patched_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = patch_tome(make("deit"), r=2, readout_block=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.save({"model": model, "x": x, "expected": expected}, tmp_path / "m.pt")
    code = ("import torch; d = torch.load(%r, weights_only=False); m = d['model']; "
            "assert type(m).__name__ == 'ToMeVisionTransformer' and m.tome.r == [2, 2, 2, 2]; "
            "assert torch.equal(m(d['x']), d['expected'])" % str(tmp_path / "m.pt"))
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attn_mask_and_is_causal_pass_to_timm_only_without_merging():
    model = patch_tome(make("deit"), r=2, readout_block=1)
    x, mask = torch.randn(2, 3, 32, 32), torch.zeros(17, 17)
    with pytest.raises(ValueError, match="turn merging and the read-out off"):
        model(x, attn_mask=mask)
    plain = make("deit")
    mask[:, 5] = float("-inf")  # no query may look at token 5
    with torch.no_grad(), tome_options(model, merge=False, readout=False):
        assert torch.equal(model(x, attn_mask=mask), plain(x, attn_mask=mask))
        assert not torch.allclose(model(x, attn_mask=mask), plain(x), atol=1e-3)
    assert model.tome_readout is None


def test_gradient_checkpointing_recomputes_blocks_with_equal_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads, calls = [], []
    for checkpointing in (False, True):
        model = patch_tome(make("deit").train(), r=2, readout_block=2)
        model.set_grad_checkpointing(checkpointing)
        hook = model.blocks[1].mlp.register_forward_hook(lambda *_: calls.append(checkpointing))
        # early stop would end a recomputation as soon as the tensors the backward needs are back
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            model(x).square().sum().backward()
        hook.remove()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert calls.count(False) == 1 and calls.count(True) == 2  # run again in the backward
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_patch_tome_takes_numpy_and_tensor_counts_and_wrapped_models():
    import numpy as np

    assert patch_tome(make("deit"), r=np.int64(2)).tome.r == [2, 2, 2, 2]
    assert patch_tome(make("deit"), r=torch.tensor(1)).tome.r == [1, 1, 1, 1]
    model = make("deit")
    compiled = torch.compile(model)
    assert patch_tome(compiled, r=1) is compiled and model.tome.r == [1, 1, 1, 1]
    assert model.tome_readout is None and model.tome_size is None  # before any forward


def seeded(model, x, seed):
    """Final tokens (B, K, C) of one forward after seeding the RNG (the drop-path draws)."""
    torch.manual_seed(seed)
    return model.forward_features(x)


def test_drop_path_and_training_mode():
    plain = make("layerscale", drop_path_rate=0.2)
    model = patch_tome(copy.deepcopy(plain), r=0, readout_block=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # without merging, eval and train mode (same seed: the same drop-path draws) are timm's own
        assert torch.allclose(model.forward_features(x), plain.forward_features(x), atol=1e-5)
        assert torch.allclose(seeded(model.train(), x, 3), seeded(plain.train(), x, 3), atol=1e-5)
        patch_tome(model, merge_num=6, readout_block=1)
        # drop path stays stochastic with merging
        assert not torch.allclose(seeded(model, x, 1), seeded(model, x, 2), atol=1e-2)
    torch.manual_seed(0)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert torch.equal(model.head.bias.grad, torch.full((5,), 2.0))  # d(sum of logits)/d(bias) = batch size
    # gradient reaches every block through merging and stochastic depth
    assert all(sum(p.grad.abs().sum() for p in blk.parameters()) > 0 for blk in model.blocks)


def test_schedules():
    assert sum(decreasing_schedule(98, 12)) == 98
    s = decreasing_schedule(98, 12)
    assert s == sorted(s, reverse=True) and s[0] > s[-1]
    assert resolve_schedule(16, 4, r=2) == [2, 2, 2, 2]
    assert resolve_schedule(16, 4, r=[1, 2, 3, 0]) == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="too large"):
        resolve_schedule(16, 4, merge_num=16)
    # 15 over 4 blocks is 6 4 3 2: 16 -> 10 -> 6 -> 3 patch tokens, and block 3 cannot merge 2 of 3;
    # 14 is 5 4 3 2, which fits (16 -> 11 -> 7 -> 4, each at most half), so the error names 14
    assert resolve_schedule(16, 4, merge_num=14) == [5, 4, 3, 2]
    with pytest.raises(ValueError, match=r"block 3 would merge 2 of the 3 patch tokens left \(at most half, 1\); "
                                         r"the largest merge_num this schedule fits is 14$"):
        resolve_schedule(16, 4, merge_num=15)
    with pytest.raises(ValueError, match="4 blocks"):
        resolve_schedule(16, 4, r=[1, 2])
    assert token_counts(17, [6, 2]) == [17, 11] and token_counts(17, []) == []
    assert token_counts(197, s) == [197, 185, 173, 162, 152, 143, 135, 127, 120, 113, 108, 103]  # by hand from s


def test_schedule_merging_in_every_kth_block():
    # the same total in fewer, larger steps: the decreasing schedule over blocks 0, k, 2k, ...
    assert decreasing_schedule(98, 12, every=1) == decreasing_schedule(98, 12)
    assert decreasing_schedule(98, 12, every=2) == [24, 0, 22, 0, 18, 0, 14, 0, 12, 0, 8, 0]  # = 6-block schedule, spread
    assert decreasing_schedule(98, 12, every=2)[::2] == decreasing_schedule(98, 6)
    # 3 merging blocks, weights 1.5, 1, 0.5: cumulative 98·1.5/3 = 49, 98·2.5/3 = 81.7 -> 82, 98
    assert decreasing_schedule(98, 12, every=5) == [49, 0, 0, 0, 0, 33, 0, 0, 0, 0, 16, 0]
    assert decreasing_schedule(10, 3, every=3) == [10, 0, 0]
    with pytest.raises(ValueError, match="at least 1"):
        decreasing_schedule(10, 3, every=0)
    assert resolve_schedule(196, 12, merge_num=98, merge_every=3) == [37, 0, 0, 28, 0, 0, 21, 0, 0, 12, 0, 0]
    with pytest.raises(ValueError, match="give merge_num"):
        resolve_schedule(196, 12, r=8, merge_every=2)
    with pytest.raises(ValueError, match="too large"):  # 16 tokens at once in block 0 of 16 patches
        resolve_schedule(16, 4, merge_num=14, merge_every=4)
    model = patch_tome(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4,
                                         embed_dim=32, num_heads=2, num_classes=5), merge_num=24, merge_every=2)
    assert model.tome.r == [18, 0, 6, 0]  # weights 1.5, 0.5: 24·1.5/2 = 18, then 6
    assert tokens_per_block(model) == [65, 47, 47, 41]


def test_bad_configurations():
    with pytest.raises(ValueError, match="out of range"):
        patch_tome(make("deit"), r=0, readout_block=4)
    with pytest.raises(ValueError, match="VisionTransformer"):
        patch_tome(torch.nn.Linear(3, 3), r=0)
    with pytest.raises(ValueError, match="too large"):
        patch_tome(make("deit"), r=9)
    # patch dropout keeps random patches: a read-out index over the whole grid would point at wrong ones
    with pytest.raises(ValueError, match="patch dropout"):
        patch_tome(make("deit", patch_drop_rate=0.5), r=0, readout_block=1)
    from timm.models.vision_transformer import ParallelScalingBlock
    with pytest.raises(ValueError, match="ParallelScalingBlock with NoneType"):
        patch_tome(make("deit", block_fn=ParallelScalingBlock), r=0)


def test_patched_model_traces_as_one_graph():
    """Static shapes and no per-call Python state: dynamo captures the merged forward, read-out
    included, without a graph break (backend 'eager' checks the tracing, not a compiler)."""
    torch._dynamo.reset()
    model = patch_tome(make("layerscale"), merge_num=8, readout_block=2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = compiled(x)
        ro = model.tome_readout
        ref = model(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(ro.attn, model.tome_readout.attn, atol=1e-6)



def test_dynamic_img_size_reads_out_on_the_grid_of_the_input():
    """A model built with dynamic_img_size takes other sizes than its configured one: the read-out
    grid and index follow the input (48 px: 6x6 patches), unmerged it still equals timm, and a
    schedule too large for a smaller input is a clear error instead of a wrong shape."""
    model = make("deit", dynamic_img_size=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
        patch_tome(model, r=0, readout_block=2)
        torch.testing.assert_close(model(x), ref)
        assert model.tome_readout.grid == (6, 6) and model.tome_readout.index.shape == (2, 36)
        patch_tome(model, r=[4, 4, 0, 0], readout_block=2)
        model(x)
        assert model.tome_readout.grid == (6, 6) and model.tome_readout.attn.shape == (2, 1 + 36 - 8)
        assert torch.equal(model.tome_readout.source.sum(1), torch.ones(2, 36))
        with pytest.raises(ValueError, match=r"schedule \[4, 4, 0, 0\] was set for 16 patches, this input has 9 \(3x3\): "
                                             r"r=4 is too large: block 1 would merge 4 of the 5"):
            model(torch.randn(2, 3, 24, 24))  # 9 patches: 4 merged leave 5, of which at most 2 may go


def test_inductor_compiled_merged_model_matches_eager():
    """torch.compile (Inductor) of a merged model, forward and backward, gives eager's logits and
    gradients: the merge's hand-written autograd.Function and its in-place row ops compile."""
    torch.manual_seed(0)
    model = patch_tome(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                                         num_heads=2, num_classes=5), r=[3, 2])
    x = torch.randn(4, 3, 32, 32)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


def test_matching_compiles_in_one_graph_and_sorts_as_eager():
    """The matching's sort is a custom op (merge.argsort_descending): traced with fake tensors it
    needs no graph break, and compiled it picks the same tokens in the same order as eager."""
    torch.manual_seed(0)
    metric = torch.randn(3, 16, 8)
    metric[:, 4:8] = metric[:, :1]  # repeated keys: ties in the best-partner scores
    compiled = torch.compile(bipartite_matching, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(metric, 5, 1), bipartite_matching(metric, 5, 1)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor lowers sorts to Triton on GPUs only")
def test_inductor_leaves_the_matching_sort_to_aten_on_cuda():
    """Inductor's generated code for a merged forward calls the ATen sort and holds no Triton sort
    kernel (those compile for minutes: see merge.argsort_descending)."""
    from torch._inductor.utils import run_and_get_code

    model = patch_tome(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                                         num_heads=2, num_classes=5), r=[3, 2]).cuda()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(model), torch.randn(4, 3, 32, 32, device="cuda"))
    code = "\n".join(code)
    assert "mergemix.argsort_descending" in code and "sort_with_index" not in code


def test_matching_metric_is_the_head_averaged_keys_of_the_timm_block():
    """ToMe's similarity metric (DESIGN §1) is the block's attention keys averaged over heads: computed
    here from timm's own unpatched block-0 modules, matched with the (hand-checked) matching rule, it
    predicts exactly which patches block 0 merges, prefix tokens excluded."""
    plain = make("distilled")  # 2 prefix tokens
    model = patch_tome(copy.deepcopy(plain), [4, 0, 0, 0], readout_block=1)
    x = torch.randn(3, 3, 32, 32)
    attn, npt = plain.blocks[0].attn, plain.num_prefix_tokens
    t = module_inputs(plain, x, attn)[0]  # normed tokens entering block 0's attention
    B, N, _ = t.shape
    with torch.no_grad():
        model(x)
        k = attn.k_norm(attn.qkv(t).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[1])
    m = bipartite_matching(k[:, :, npt:].mean(1), 4, num_prefix=npt)
    assert torch.equal(model.tome_readout.index, merged_positions(m)[:, npt:])


def test_attention_dropout_only_in_training():
    """timm drops attention weights only in training mode: in eval a patched model is deterministic
    and, unmerged, timm's own; in training, merged, the dropout still acts."""
    plain = make("deit", attn_drop_rate=0.5)
    model = patch_tome(copy.deepcopy(plain), r=0, readout_block=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)
        patch_tome(model, r=2, readout_block=1)
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x), atol=1e-3)


def test_negative_readout_block_counts_from_the_end():
    """readout_block=-1 is the last block, as Python indexes: the read-out there is timm's own CLS
    attention of block 3 (of 4), computed from the unpatched modules."""
    plain = make("deit")
    x = torch.randn(2, 3, 32, 32)
    model = patch_tome(copy.deepcopy(plain), r=0, readout_block=-1)
    assert model.tome.readout_block == 3
    with torch.no_grad():
        model(x)
    assert model.tome_readout is not None
    assert torch.allclose(model.tome_readout.attn, cls_attention_direct(plain, x, 3), atol=1e-5)
