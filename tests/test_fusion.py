"Contract and property tests for every fusion in `mmfusion.fusion.FUSIONS` (tiny dims, CPU, a few seconds)"
from itertools import combinations

import pytest, torch, torch.nn as nn, torch.nn.functional as F

from mmfusion.data import tiny_dataset
from mmfusion.fusion import (FUSIONS, Fusion, FusionOutput, MapFusionOutput, attend, drop_modalities, masked_softmax,
                             pool_tokens)

MODS, DIMS, MAP_DIMS, B = ['a', 'b', 'c'], {'a': 6, 'b': 4, 'c': 5}, {'a': 4, 'b': 6, 'c': 4}, 7
SUBSETS = [s for r in range(1, 4) for s in combinations(range(3), r)]
MIXED = torch.tensor([[i in s for i in range(3)] for s in SUBSETS])  # one row per non-empty subset
NAMES = FUSIONS.names
TOKEN_NAMES = [n for n in NAMES if not FUSIONS._items[n].takes_maps]
MAP_NAMES = [n for n in NAMES if FUSIONS._items[n].takes_maps]


def build(name, modalities=MODS, **kw):
    "A tiny fusion of `name` (2 heads where it has heads)"
    cls = FUSIONS._items[name]
    extra = {'n_heads': 2} if 'n_heads' in cls.__init__.__code__.co_varnames else {}
    return FUSIONS.build({'name': name, 'dim': 8, **extra, **kw}, modalities=modalities,
                         dims=MAP_DIMS if cls.takes_maps else DIMS)


def raw_inputs(fusion, n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, 3, 4, 4, generator=g) if fusion.takes_maps else torch.randn(n, 5, 3, generator=g)
            for m in fusion.modalities}


def stand_in_encoders(fusion):
    return nn.ModuleDict({m: nn.Conv2d(3, d, 3, padding=1) if fusion.takes_maps else nn.Linear(3, d)
                          for m, d in fusion.dims.items()})


def run(fusion, encoders, raw, present, drop=()):
    return fusion({m: encoders[m](x) for m, x in raw.items() if m not in drop}, present).fused


def test_registry_has_every_method():
    expected = {'concat', 'late', 'weighted', 'gated', 'transformer', 'fusion_tokens', 'tensor', 'low_rank_tensor',
                'map_attention', 'map_weighted', 'map_concat', 'map_lean'}
    assert expected <= set(NAMES)


def test_unknown_name_says_what_is_known():
    with pytest.raises(KeyError, match="unknown fusion 'nope'"): FUSIONS.build({'name': 'nope'}, modalities=MODS, dims=DIMS)


def test_user_fusion_registers_and_builds():
    @FUSIONS.register('test_sum')
    class SumFusion(Fusion):
        def __init__(self, modalities, dims, dim=8, **kw):
            super().__init__(modalities, dims, dim, **kw)
            self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in self.dims.items()})
        def fuse(self, xs, masks, present):
            return FusionOutput(sum(self.proj[m](pool_tokens(x, mk)) for m, x, mk in zip(self.modalities, xs, masks)))
    try:
        f = FUSIONS.build('test_sum', modalities=MODS, dims=DIMS)
        assert f({m: torch.randn(2, 3, d) for m, d in DIMS.items()}, torch.ones(2, 3)).fused.shape == (2, 8)
    finally: FUSIONS._items.pop('test_sum')


@pytest.mark.parametrize('name', NAMES)
def test_output_shape(name):
    f = build(name)
    out = run(f, stand_in_encoders(f), raw_inputs(f), MIXED)
    assert out.shape == ((B, f.out_dim, 4, 4) if f.takes_maps else (B, f.out_dim))
    assert isinstance(f(*[{m: stand_in_encoders(f)[m](x) for m, x in raw_inputs(f).items()}, MIXED]),
                      MapFusionOutput if f.takes_maps else FusionOutput)


@pytest.mark.parametrize('norm', [False, True])
@pytest.mark.parametrize('name', NAMES)
def test_every_subset_finite_and_absent_contributes_nothing(name, norm):
    f = build(name, norm_before_fusion=norm).eval()
    enc, raw = stand_in_encoders(f), raw_inputs(f)
    with torch.no_grad():
        out = run(f, enc, raw, MIXED)
        assert torch.isfinite(out).all()
        poisoned = {m: torch.where(MIXED[:, i].view(-1, *[1] * (x.ndim - 1)), x, float('nan')) for i, (m, x) in enumerate(raw.items())}
        assert torch.equal(run(f, enc, poisoned, MIXED), out), "absent modalities' data leaked into the output"
        for s in SUBSETS:  # the exhaustive subset loop, the whole batch at once
            cols = torch.tensor([i in s for i in range(3)]).expand(B, 3)
            gone = [m for i, m in enumerate(MODS) if i not in s]
            marked, left_out = run(f, enc, raw, cols), run(f, enc, raw, cols, drop=gone)
            assert torch.isfinite(marked).all() and torch.isfinite(left_out).all(), s
            torch.testing.assert_close(left_out, marked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_no_modality_present_is_still_finite(name):
    f = build(name).eval()
    with torch.no_grad():
        out = run(f, stand_in_encoders(f), raw_inputs(f, n=2), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', NAMES)
def test_gradient_reaches_present_encoders_only(name):
    f = build(name)
    enc, raw = stand_in_encoders(f), {m: x.requires_grad_() for m, x in raw_inputs(f).items()}
    out = run(f, enc, raw, MIXED)
    (out * torch.randn_like(out)).sum().backward()
    for i, m in enumerate(MODS):
        per_sample = raw[m].grad.flatten(1).abs().sum(1)
        assert torch.equal(per_sample > 0, MIXED[:, i]), (m, per_sample)
        assert enc[m].weight.grad.abs().sum() > 0
    for p in f.parameters(): assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize('name', NAMES)
def test_absent_everywhere_gets_no_gradient(name):
    f = build(name)
    enc, raw = stand_in_encoders(f), raw_inputs(f)
    present = torch.ones(B, 3, dtype=torch.bool)
    present[:, 1] = False
    out = run(f, enc, raw, present)
    (out * torch.randn_like(out)).sum().backward()
    assert enc['b'].weight.grad is None or enc['b'].weight.grad.abs().sum() == 0
    assert enc['a'].weight.grad.abs().sum() > 0 and enc['c'].weight.grad.abs().sum() > 0


@pytest.mark.parametrize('name', NAMES)
def test_same_seed_same_result(name):
    def once(seed):
        torch.manual_seed(seed)
        f = build(name, modality_dropout=0.3).train()
        enc, raw = stand_in_encoders(f), raw_inputs(f)
        torch.manual_seed(seed + 1)
        return run(f, enc, raw, MIXED)
    assert torch.equal(once(0), once(0))


@pytest.mark.parametrize('name', NAMES)
def test_permutation_invariance_where_claimed(name):
    f = build(name).eval()
    if not f.permutation_invariant: pytest.skip(f"{name} does not claim permutation invariance")
    g = build(name, modalities=['c', 'a', 'b']).eval()
    g.load_state_dict(f.state_dict())
    enc, raw = stand_in_encoders(f), raw_inputs(f)
    with torch.no_grad():
        torch.testing.assert_close(run(g, enc, raw, MIXED[:, [2, 0, 1]]), run(f, enc, raw, MIXED), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_return_attention_does_not_change_the_output(name):
    torch.manual_seed(0)
    f = build(name).eval()
    enc, raw = stand_in_encoders(f), raw_inputs(f)
    with torch.no_grad():
        plain = run(f, enc, raw, MIXED)
        f.return_attention = True
        torch.testing.assert_close(run(f, enc, raw, MIXED), plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('name', TOKEN_NAMES)
def test_padded_tokens_are_ignored(name):
    f = build(name).eval()
    torch.manual_seed(0)
    tokens = {m: torch.randn(2, 6, d) for m, d in DIMS.items()}
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    padded = {**tokens, 'b': torch.cat([tokens['b'][:, :4], torch.full((2, 2, DIMS['b']), float('nan'))], 1)}
    present = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        masked = f(padded, present, {'b': mask}).fused
        truncated = f({**tokens, 'b': tokens['b'][:, :4]}, present).fused
    torch.testing.assert_close(masked, truncated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', TOKEN_NAMES)
def test_precomputed_embeddings_and_tiny_dataset(name):
    batch = next(iter(tiny_dataset(n=12).loader(batch_size=12)))
    torch.manual_seed(0)
    patch = lambda c: lambda x: c(x).flatten(2).transpose(1, 2)
    enc = {'image': patch(nn.Conv2d(3, 8, 4, stride=4)), 'audio': patch(nn.Conv2d(1, 8, 4, stride=4)),
           'series': nn.Linear(4, 8), 'tabular': nn.Linear(6, 8)}
    cls = FUSIONS._items[name]
    extra = {'n_heads': 2} if 'n_heads' in cls.__init__.__code__.co_varnames else {}
    f = FUSIONS.build({'name': name, 'dim': 8, **extra}, modalities=batch['modalities'], dims={m: 8 for m in batch['modalities']})
    out = f({m: enc[m](x) for m, x in batch['inputs'].items()}, batch['present'], batch['masks'])
    assert out.fused.shape == (12, f.out_dim) and torch.isfinite(out.fused).all()
    assert not batch['present'].all()  # audio is absent for some samples


def test_input_errors():
    f = build('concat')
    with pytest.raises(KeyError, match="unknown modality 'x'"): f({'x': torch.randn(2, 3, 6)}, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"expected \(B, 3\)"): f({'a': torch.randn(2, 3, 6)}, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"expected \(2, N, 6\)"): f({'a': torch.randn(2, 3, 5)}, torch.ones(2, 3))
    with pytest.raises(ValueError, match='dims has no entry'): FUSIONS.build('concat', modalities=MODS, dims={'a': 1})
    with pytest.raises(ValueError, match='maps have|map has shape'):
        build('map_weighted')({'a': torch.randn(2, 4, 3, 3), 'b': torch.randn(2, 6, 5, 5)}, torch.ones(2, 3))


def test_norm_before_fusion_equalises_a_1000x_imbalance():
    torch.manual_seed(0)
    feats = {'images': 1000 * torch.randn(64, 4, 8), 'wind': torch.randn(64, 4, 8)}
    both = torch.ones(64, 2, dtype=torch.bool)
    def contribution(f, name):  # how far the output moves when `name`'s features are shuffled across samples
        with torch.no_grad():
            full, shuffled = f(feats, both).fused, f({**feats, name: feats[name].roll(1, 0)}, both).fused
        return ((full - shuffled).norm() / full.norm()).item()
    for name in TOKEN_NAMES:
        ratio = {}
        for norm in (False, True):
            torch.manual_seed(0)
            f = FUSIONS.build({'name': name, 'dim': 16, 'norm_before_fusion': norm}, modalities=['images', 'wind'], dims={'images': 8, 'wind': 8})
            ratio[norm] = contribution(f, 'wind') / contribution(f, 'images')
        assert 0.2 < ratio[True] < 5, (name, ratio)  # with LayerNorm: comparable
        if name in ('concat', 'weighted', 'late'): assert ratio[False] < 0.01, (name, ratio)  # without: swamped


def test_modality_dropout():
    present = torch.ones(2000, 3, dtype=torch.bool)
    present[::3, 1] = False
    d = drop_modalities(present, 0.4, torch.Generator().manual_seed(0))
    assert not (d & ~present).any() and d.any(1).all()
    assert abs(1 - d.sum().item() / present.sum().item() - 0.4) < 0.08
    assert d.sum(1).eq(1).all() == False  # noqa: E712 -- some samples keep several
    assert drop_modalities(present, 1.0).sum(1).eq(1).all()  # p=1 keeps exactly one
    f = build('weighted', modality_dropout=0.5, return_attention=True)
    x = {m: torch.randn(50, 2, d) for m, d in DIMS.items()}
    assert (f.eval()(x, torch.ones(50, 3)).attention > 0).all()  # eval: no-op
    assert (f.train()(x, torch.ones(50, 3)).attention == 0).any()


def test_attend_never_nan():
    q = torch.randn(3, 2, 4, 8, requires_grad=True)
    key_mask = torch.tensor([[True, False, True, False, False], [False] * 5, [True] * 5])[:, None]  # (B, heads=1, Nk)
    k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    out, w = attend(q, k, v, key_mask, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all() and out[1].abs().sum() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    ref = F.softmax((q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~key_mask[:, :, None], float('-inf')), -1) @ v
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w[[0, 2]] @ v[[0, 2]], out[[0, 2]], atol=1e-5, rtol=1e-5)


def test_masked_softmax_and_pool():
    w = masked_softmax(torch.randn(4, 3), torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]]).bool())
    torch.testing.assert_close(w.sum(-1), torch.tensor([1., 1., 0., 1.]))
    assert w[1, 0] == 1 and (w[2] == 0).all()
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(pool_tokens(x, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()), torch.stack([x[0, :2].mean(0), x[1].mean(0)]))


def test_late_fusion_is_the_mean_of_present_heads_logits():
    f = build('late', n_outputs=3)
    x = {m: torch.randn(4, 2, d) for m, d in DIMS.items()}
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 1, 0]]).bool()
    o = f(x, present)
    assert f.out_dim == 3 and o.fused.shape == (4, 3) and o.tokens.shape == (4, 3, 3)
    expected = (o.tokens * present[..., None]).sum(1) / present.sum(1, keepdim=True)
    torch.testing.assert_close(o.fused, expected)


def test_map_attention_is_local():
    "Attention runs across modalities per location: changing one pixel changes the output at that pixel only"
    f = build('map_attention').eval()
    maps = {m: torch.randn(1, d, 6, 6) for m, d in MAP_DIMS.items()}
    with torch.no_grad():
        a = f(maps, torch.ones(1, 3)).fused
        maps['b'][0, :, 2, 3] += 5
        changed = (f(maps, torch.ones(1, 3)).fused - a).abs().sum(1)[0] > 1e-6
    assert changed[2, 3] and changed.sum() == 1


def test_map_lean_weights_follow_content_per_location():
    "Planted truth: a query that reads channel 0 of the keys; the modality whose map is marked at a location gets nearly all of that location's weight"
    mods = ['thermal', 'nvg', 'visual']
    f = FUSIONS.build({'name': 'map_lean', 'dim': 4, 'key_dim': 2, 'stride': 1, 'return_attention': True}, modalities=mods, dims={m: 4 for m in mods}).eval()
    with torch.no_grad():
        for m in mods: f.keys[m].weight.zero_(); f.keys[m].bias.zero_(); f.keys[m].weight[0, 0] = 1.  # key = the map's channel 0
        f.query.bias[0] = 20.  # a constant query along key channel 0: logit = 20 x channel 0 / sqrt(2)
        marked = torch.randint(0, 3, (2, 1, 5, 5))
        maps = {m: torch.cat([(marked == i).float(), torch.randn(2, 3, 5, 5)], 1) for i, m in enumerate(mods)}
        w = f(maps, torch.ones(2, 3)).attention  # (B, H, W, M)
        assert (w.argmax(-1) == marked[:, 0]).all() and (w.max(-1).values > 0.99).all()
        absent = f(maps, torch.tensor([[1, 0, 1], [1, 1, 1]]).bool()).attention
        assert (absent[0, ..., 1] == 0).all()  # an absent modality gets no weight anywhere


def test_map_lean_is_much_cheaper_than_map_attention():
    "Multiply-adds of one forward pass at a P4-like size (counted by torch's flop counter, not timed): the lean fusion is > 20x cheaper"
    from torch.utils.flop_counter import FlopCounterMode
    mods = ['thermal', 'nvg', 'visual']
    maps = {m: torch.randn(1, 64, 20, 20) for m in mods}
    flops = {}
    for name in ('map_lean', 'map_attention'):
        f = FUSIONS.build({'name': name, 'dim': 64}, modalities=mods, dims={m: 64 for m in mods})
        with FlopCounterMode(display=False) as counter: f(maps, torch.ones(1, 3))
        flops[name] = counter.get_total_flops()
    assert flops['map_attention'] > 20 * flops['map_lean'], flops


@pytest.mark.parametrize('norm', [False, True])
@pytest.mark.parametrize('name', MAP_NAMES)
def test_baseline_first_initialisation(name, norm):
    torch.manual_seed(0)
    mods = ['thermal', 'nvg', 'visual']
    f = FUSIONS.build({'name': name, 'dim': 8, 'base': 'thermal', 'norm_before_fusion': norm}, modalities=mods, dims={m: 8 for m in mods}).eval()
    maps = {m: torch.randn(3, 8, 5, 5) for m in mods}
    with torch.no_grad():
        assert torch.equal(f(maps, torch.ones(3, 3)).fused, maps['thermal'])  # exactly the base map at init
        no_base = f({m: maps[m] for m in ['nvg', 'visual']}, torch.tensor([[0, 1, 1], [0, 0, 1], [0, 1, 0]]).bool()).fused
    assert torch.isfinite(no_base).all()
    torch.testing.assert_close(no_base[0], (maps['nvg'][0] + maps['visual'][0]) / 2)
    torch.testing.assert_close(no_base[1], maps['visual'][1])


def test_baseline_first_lets_gradient_through_after_one_step():
    torch.manual_seed(0)
    mods = ['thermal', 'nvg', 'visual']
    f = FUSIONS.build({'name': 'map_attention', 'dim': 8, 'n_heads': 2, 'base': 'thermal'}, modalities=mods, dims={m: 8 for m in mods})
    enc = nn.ModuleDict({m: nn.Conv2d(3, 8, 3, padding=1) for m in mods})
    x, target = {m: torch.randn(2, 3, 6, 6) for m in mods}, torch.randn(2, 8, 6, 6)
    opt = torch.optim.SGD([*enc.parameters(), *f.parameters()], lr=0.1)
    seen = []
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(f({m: enc[m](v) for m, v in x.items()}, torch.ones(2, 3)).fused, target).backward()
        seen.append(enc['nvg'].weight.grad.abs().sum().item())
        opt.step()
    assert seen[0] == 0 and seen[1] > 0


def test_base_mode_errors():
    with pytest.raises(ValueError, match="base 'x'"): FUSIONS.build({'name': 'map_concat', 'base': 'x'}, modalities=MODS, dims={m: 64 for m in MODS})
    with pytest.raises(ValueError, match='channels == dim'): build('map_concat', base='a')
