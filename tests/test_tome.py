"""Token merging and read-out checked against timm's own modules and hand computations."""
import copy

import pytest
import timm
import torch

from mergemix.mask import recover
from mergemix.merge import bipartite_matching, decreasing_schedule, merge_tokens, merged_positions
from mergemix.tome import configure_tome, forward_readout, patch_tome, resolve_schedule, tokens_per_block

MODELS = {
    "deit": ("deit_tiny_patch16_224", {}),
    "layerscale": ("deit3_small_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_qknorm": ("vit_small_patch16_224", {"reg_tokens": 2, "qk_norm": True}),
}


def make(name: str, **extra) -> torch.nn.Module:
    arch, kw = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(arch, img_size=32, patch_size=8, depth=4, num_classes=5, **kw, **extra).eval()


def cls_attention_direct(model, x, block):
    """CLS-row attention of ``block`` over all tokens, computed from timm's own unpatched modules."""
    captured = {}
    attn = model.blocks[block].attn
    h = attn.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
    model(x)
    h.remove()
    t = captured["x"]
    B, N, _ = t.shape
    q, k, _ = attn.qkv(t).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)[:, :, 0].mean(1)


@pytest.mark.parametrize("name", list(MODELS))
def test_r0_equals_timm(name):
    model = make(name)
    x = torch.randn(3, 3, 32, 32)
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
        model(torch.randn(4, 3, 32, 32))
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
    # the gradient of the in-place formulation matches finite differences
    assert torch.autograd.gradcheck(lambda t: merge_tokens(t, size.double(), m)[0], x.double().requires_grad_())
    # the r best-matching A tokens are the merged ones (hand check of the matching rule)
    a = metric / metric.norm(dim=-1, keepdim=True)
    best = (a[:, ::2] @ a[:, 1::2].transpose(1, 2)).max(-1).values
    assert torch.equal(m.src.sort(1).values, 2 * best.topk(r, dim=1).indices.sort(1).values)


def test_merged_token_is_average_inside_model():
    """Tokens entering block 0's MLP are the mean of the timm residual stream over their members."""
    plain = make("deit")
    model = patch_tome(copy.deepcopy(plain), [4, 0, 0, 0], readout_block=1)
    x = torch.randn(2, 3, 32, 32)
    grab = lambda store: (lambda mod, args: store.setdefault("x", args[0]))  # noqa: E731
    ref, got = {}, {}
    plain.blocks[0].norm2.register_forward_pre_hook(grab(ref))
    model.blocks[0].norm2.register_forward_pre_hook(grab(got))
    with torch.no_grad():
        plain(x)
        model(x)
    S = model.tome_readout.source  # (B, K, L), valid at block 1 = right after block 0's merge
    expected = torch.cat([ref["x"][:, :1], (S[:, 1:] @ ref["x"][:, 1:]) / S[:, 1:].sum(-1, keepdim=True)], 1)
    assert torch.allclose(got["x"], expected, atol=1e-5)


@pytest.mark.parametrize("name", ["deit", "distilled"])
def test_readout_aligned_with_timm_block(name):
    """Merging only after the read-out block: recovered scores = timm's own CLS attention there."""
    plain = make(name)
    x = torch.randn(3, 3, 32, 32)
    direct = cls_attention_direct(plain, x, 2)
    model = patch_tome(copy.deepcopy(plain), [0, 0, 3, 2], readout_block=2)
    with torch.no_grad():
        model(x)
    ro = model.tome_readout
    npt = model.num_prefix_tokens
    assert torch.allclose(ro.attn, direct, atol=1e-5)
    assert torch.allclose(recover(ro.attn, ro.source), direct[:, npt:], atol=1e-5)
    assert torch.allclose(recover(ro.attn, ro.index), direct[:, npt:], atol=1e-5)


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
        patch_tome(model, r=[4, 0])
        assert model(x).shape == (2, 5)


def test_drop_path_and_training_mode_run():
    model = patch_tome(make("layerscale", drop_path_rate=0.2), merge_num=6, readout_block=1).train()
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_schedules():
    assert sum(decreasing_schedule(98, 12)) == 98
    s = decreasing_schedule(98, 12)
    assert s == sorted(s, reverse=True) and s[0] > s[-1]
    assert resolve_schedule(16, 4, r=2) == [2, 2, 2, 2]
    assert resolve_schedule(16, 4, r=[1, 2, 3, 0]) == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="too large"):
        resolve_schedule(16, 4, merge_num=16)
    with pytest.raises(ValueError, match="4 blocks"):
        resolve_schedule(16, 4, r=[1, 2])


def test_bad_configurations():
    with pytest.raises(ValueError, match="out of range"):
        patch_tome(make("deit"), r=0, readout_block=4)
    with pytest.raises(ValueError, match="VisionTransformer"):
        patch_tome(torch.nn.Linear(3, 3), r=0)
    with pytest.raises(ValueError, match="too large"):
        patch_tome(make("deit"), r=9)


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

