"""Fusion benchmark (not in CI): forward+backward time of mmfusion's map fusions against the night plan's design, and (--full) peak memory.

Default run, side by side in one process (issue 17's measurement): the default map fusion (`map_lean`), `map_attention` and
the night plan's `CrossModalAttention` (below), 3 modalities x 256 channels, batch 2, forward+backward in train mode, 2 CPU
threads, at P4 (40x40) and P3 (80x80) of a 640 input. After one warm-up pass each, the models are timed in --rounds
rounds of one pass each (so a burst of load from other processes hits all of them alike); the median, the minimum (the
least disturbed pass) and the median CPU seconds (robust to waiting for a busy core) per model are reported. The plan's attention is not run where its attention scores alone would exceed the memory budget (P3). Goals:
the default >= 50x faster than the plan at P4, under 1 s at P3. Writes benchmarks/results/fusion_bench.json (date,
commit, machine, recipe).

--full also runs the older, slower comparison (fresh processes per case, peak memory):
(a) `map_attention` (spatial modality attention: at each location, attention across the M modalities, O(H·W·M²))
    vs the night plan's `CrossModalAttention` (seed 000: self-attention over all H·W positions of each modality, then
    the mean over modalities, O(M·(H·W)²)), three 256-channel maps at P5 (20×20), P4 (40×40), P3 (80×80) of a 640 input,
    8 heads, MLP ×4, dropout 0.1 (the plan's values), batch 12 (the plan's Phase-3 `batch: 12`).
(b) `fusion_tokens` vs the weld plan's `CrossAttentionFusionModule` (seed 001: per-modality `nn.MultiheadAttention`
    with 4 shared fusion tokens, residual + LayerNorm, concat, MLP 8192 → 1024 → 512, output projection), hidden 512,
    4 tokens, 8 heads, batch 16, dropout 0.1. Token counts from the plan's encoders and input shapes:
      video   3136 × 1024  V-JEPA 2 ViT-L/16 (tubelet 2): 32 frames at 224² → 16 × 14 × 14
      images   257 × 768   DINOv2-base/14 at 224²: 16 × 16 patches + CLS (5 angles, the plan's 'mean' aggregation)
      audio    659 × 768   AST (16×16 patches, stride 14 × 14): 128 mels × 1024 frames (the feature extractor pads the
                           plan's 256 frames to the checkpoint's max_length 1024) → 9 × 73 patches + CLS + distillation
      sensors  256 × 256   from-scratch Transformer over the 256 × 6 series

Each case runs in a fresh subprocess (2 CPU threads, float32, train mode). Peak memory = the resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs just before the first forward) minus the resident set at that moment:
the memory the first forward+backward added on top of the module and its inputs. Time = median of the timed
forward+backward passes after that first one (2 passes; 1 at P4 and P3, where one pass takes a minute or more). A case whose estimated peak exceeds the memory budget is not started:
its batch is halved (12 → 6 → 3 → 1) until the estimate fits; each child also runs under an address-space limit so a
wrong estimate ends in a clean allocation error (then the batch is halved again), not in a dead machine.
On a machine whose other processes keep every core busy, two threads of a small operation wait for each other: run it
also with --threads 1 --out benchmarks/results/fusion_bench_1thread.json (02_fusion shows both).
Run: .venv/bin/python benchmarks/fusion_bench.py [--rounds 5] [--threads 2] [--full] [--out PATH]
"""
from __future__ import annotations
import argparse, json, os, re, resource, statistics, subprocess, sys, time
from pathlib import Path

GiB = 2 ** 30
NIGHT_MODS = ['thermal', 'nvg', 'visual']
NIGHT_BATCH, NIGHT_CHANNELS, NIGHT_HEADS = 12, 256, 8
WELD_TOKENS = {'video': (3136, 1024), 'images': (257, 768), 'audio': (659, 768), 'sensors': (256, 256)}
WELD_BATCH, WELD_HIDDEN, WELD_HEADS, WELD_FUSION_TOKENS = 16, 512, 8, 4
SIZES = [('P5', 20), ('P4', 40), ('P3', 80)]


# ---------------------------------------------------------------- the plans' designs, as their seeds write them
def plan_modules():
    import torch, torch.nn as nn, torch.nn.functional as F

    class CrossModalAttention(nn.Module):
        "Seed 000 (night plan) `CrossModalAttention`: self-attention over all H*W positions of each modality, then mean"
        def __init__(self, dim, num_heads=8, dropout=0.1):
            super().__init__()
            self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
            assert dim % num_heads == 0, "dim must be divisible by num_heads"
            self.qkv = nn.Linear(dim, dim * 3)
            self.attn_drop = nn.Dropout(dropout)
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(dropout)
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * 4, dim), nn.Dropout(dropout))

        def forward(self, thermal_feat, nvg_feat, rgb_feat):
            B, C, H, W = thermal_feat.shape
            x = torch.stack([thermal_feat, nvg_feat, rgb_feat], dim=0)  # [3, B, C, H, W]
            x = x.flatten(3).transpose(2, 3)  # [3, B, HW, C]
            num_modalities = x.shape[0]
            x_flat = x.reshape(-1, H * W, C)  # [3*B, HW, C]
            shortcut = x_flat
            x_flat = self.norm1(x_flat)
            qkv = self.qkv(x_flat).reshape(-1, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q @ k.transpose(-2, -1)) / (self.head_dim ** 0.5)  # [3B, heads, HW, HW]
            attn = F.softmax(attn, dim=-1)
            attn = self.attn_drop(attn)
            x_flat = (attn @ v).transpose(1, 2).reshape(-1, H * W, C)
            x_flat = self.proj_drop(self.proj(x_flat))
            x_flat = shortcut + x_flat
            x_flat = x_flat + self.mlp(self.norm2(x_flat))
            x = x_flat.reshape(num_modalities, B, H, W, C).permute(0, 1, 4, 2, 3)
            return x.mean(dim=0)  # [B, C, H, W]

    class CrossAttentionFusionModule(nn.Module):
        "Seed 001 (weld plan): project to 512, 4 fusion tokens cross-attend to each modality, residual + LayerNorm, concat, MLP"
        def __init__(self, dims, hidden_dim=512, num_fusion_tokens=4, num_heads=8, dropout=0.1):
            super().__init__()
            self.proj = nn.ModuleDict({m: nn.Linear(d, hidden_dim) for m, d in dims.items()})
            self.fusion_tokens = nn.Parameter(torch.randn(1, num_fusion_tokens, hidden_dim) * 0.02)
            self.cross_attn = nn.ModuleDict({m: nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True) for m in dims})
            self.norms = nn.ModuleDict({m: nn.LayerNorm(hidden_dim) for m in dims})
            n = len(dims) * num_fusion_tokens * hidden_dim  # 4 x 4 x 512 = 8192
            self.mlp = nn.Sequential(nn.Linear(n, 2 * hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * hidden_dim, hidden_dim))
            self.output_proj = nn.Linear(hidden_dim, hidden_dim)

        def forward(self, features, return_attention=False):
            B = next(iter(features.values())).shape[0]
            q = self.fusion_tokens.expand(B, -1, -1)
            outs, attention = [], {}
            for m, x in features.items():
                kv = self.proj[m](x)
                o, attention[m] = self.cross_attn[m](q, kv, kv)  # need_weights defaults to True (for visualisation)
                outs.append(self.norms[m](q + o))
            fused = self.output_proj(self.mlp(torch.cat(outs, 1).flatten(1)))
            return (fused, attention) if return_attention else fused

    return CrossModalAttention, CrossAttentionFusionModule


# ---------------------------------------------------------------- one case, in a fresh process
def _busy_cpu_s():
    "CPU seconds the whole machine has spent busy (from /proc/stat)"
    v = [int(x) for x in open('/proc/stat').readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf('SC_CLK_TCK')

def _status(key):
    return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1)) * 1024

def run_case(case, batch, size, reps):
    "Build the case, run forward+backward `1 + reps` times; return time and peak memory"
    import torch
    from mmfusion.fusion import FUSIONS
    torch.manual_seed(0)
    CrossModalAttention, CrossAttentionFusionModule = plan_modules()
    if case.startswith('night'):
        maps = {m: torch.randn(batch, NIGHT_CHANNELS, size, size, requires_grad=True) for m in NIGHT_MODS}
        inputs = list(maps.values())
        if case == 'night_ours':
            f = FUSIONS.build({'name': 'map_attention', 'dim': NIGHT_CHANNELS, 'n_heads': NIGHT_HEADS, 'mlp_ratio': 4, 'dropout': 0.1},
                              modalities=NIGHT_MODS, dims={m: NIGHT_CHANNELS for m in NIGHT_MODS})
            present = torch.ones(batch, 3, dtype=torch.bool)
            step = lambda: f(maps, present).fused
        else:
            f = CrossModalAttention(NIGHT_CHANNELS, NIGHT_HEADS, 0.1)
            step = lambda: f(*inputs)
    else:
        feats = {m: torch.randn(batch, n, d, requires_grad=True) for m, (n, d) in WELD_TOKENS.items()}
        inputs = list(feats.values())
        if case == 'weld_ours':
            f = FUSIONS.build({'name': 'fusion_tokens', 'dim': WELD_HIDDEN, 'n_tokens': WELD_FUSION_TOKENS, 'n_heads': WELD_HEADS,
                               'mlp_ratio': 2, 'dropout': 0.1}, modalities=list(WELD_TOKENS), dims={m: d for m, (n, d) in WELD_TOKENS.items()})
            present = torch.ones(batch, len(feats), dtype=torch.bool)
            step = lambda: f(feats, present).fused
        else:
            f = CrossAttentionFusionModule({m: d for m, (n, d) in WELD_TOKENS.items()}, WELD_HIDDEN, WELD_FUSION_TOKENS, WELD_HEADS, 0.1)
            step = lambda: f(feats)
    f.train()
    params = [*f.parameters(), *inputs]

    def fwd_bwd():
        for p in params: p.grad = None
        t = time.perf_counter()
        step().mean().backward()
        return time.perf_counter() - t

    busy0, own0, wall0 = _busy_cpu_s(), sum(os.times()[:2]), time.perf_counter()
    rss = _status('VmRSS')
    open('/proc/self/clear_refs', 'w').write('5')  # reset the high-water mark
    first = fwd_bwd()
    peak = _status('VmHWM') - rss
    times = [fwd_bwd() for _ in range(reps)]
    others = ((_busy_cpu_s() - busy0) - (sum(os.times()[:2]) - own0)) / (time.perf_counter() - wall0)  # cores used by others
    return {'ok': True, 'time_s': statistics.median(times) if times else first, 'first_s': first, 'peak_bytes': peak,
            'params': sum(p.numel() for p in f.parameters()), 'threads': torch.get_num_threads(),
            'other_cores': max(others, 0.)}

def child_main(args):
    import torch
    torch.set_num_threads(args.threads)
    resource.setrlimit(resource.RLIMIT_AS, (args.as_limit, args.as_limit))
    try: res = run_case(args.case, args.batch, args.size, args.reps)
    except (RuntimeError, MemoryError) as e: res = {'ok': False, 'error': str(e).splitlines()[0][:160]}
    print('RESULT ' + json.dumps(res), flush=True)


# ---------------------------------------------------------------- the driver
def mem_available():
    return int(re.search(r'MemAvailable:\s+(\d+)', open('/proc/meminfo').read()).group(1)) * 1024

def spawn(case, batch, size, reps, budget, threads):
    "Run one case in a fresh process, its address space capped at ~budget above the interpreter's own"
    cmd = [sys.executable, __file__, '--case', case, '--batch', str(batch), '--size', str(size), '--reps', str(reps),
           '--threads', str(threads), '--as-limit', str(int(budget + 4 * GiB))]  # + 4 GiB: torch's own mappings
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith('RESULT ')), None)
    if line is None: return {'ok': False, 'error': f'process ended with code {p.returncode}: {p.stderr.strip()[-160:]}'}
    RESULTS.append(json.loads(line[7:]))
    return RESULTS[-1]

def night_plan_scores(batch, size):
    "Attention scores the plan's CrossModalAttention holds: 3 modalities x batch x heads x (H*W)^2"
    return 3 * batch * NIGHT_HEADS * (size * size) ** 2

def fmt_busy(*rs):
    "Most CPU cores other processes used during these cases (0 = the timings had the machine to themselves)"
    return f"{max((r.get('other_cores', 0.) for r in rs if r and r.get('ok')), default=0.):6.2f}"

def fmt_t(r): return f"{r['time_s']:8.3f} s" if r and r.get('ok') else '       --'
def fmt_m(r): return f"{r['peak_bytes'] / GiB:7.2f} GiB" if r and r.get('ok') else '         --'
def ratio(a, b, key):
    return f"{b[key] / a[key]:7.1f}x" if a and b and a.get('ok') and b.get('ok') and a[key] > 0 else '      --'

RESULTS = []

# ---------------------------------------------------------------- issue 17: side by side in one process
SIDE_BATCH, SIDE_SIZES = 2, [('P4', 40), ('P3', 80)]
SIDE_FUSIONS = {'map_lean (default)': {'name': 'map_lean'},
                'map_attention': {'name': 'map_attention', 'n_heads': NIGHT_HEADS, 'mlp_ratio': 4, 'dropout': 0.1}}

def side_by_side(size:int, rounds:int, budget:float) -> dict:
    "Median forward+backward seconds of the default map fusion, map_attention and (where it fits) the plan, interleaved rounds"
    import torch
    from mmfusion.fusion import FUSIONS
    CrossModalAttention, _ = plan_modules()
    torch.manual_seed(0)
    maps = {m: torch.randn(SIDE_BATCH, NIGHT_CHANNELS, size, size, requires_grad=True) for m in NIGHT_MODS}
    present = torch.ones(SIDE_BATCH, 3, dtype=torch.bool)
    steps = {}
    for name, cfg in SIDE_FUSIONS.items():
        f = FUSIONS.build({**cfg, 'dim': NIGHT_CHANNELS, 'base': 'thermal'}, modalities=NIGHT_MODS, dims={m: NIGHT_CHANNELS for m in NIGHT_MODS}).train()
        steps[name] = (f, lambda f=f: f(maps, present).fused)
    plan_bytes = night_plan_scores(SIDE_BATCH, size) * 20.0  # scores + softmax + dropout + gradients, ~20 B per score
    if plan_bytes <= budget:
        plan = CrossModalAttention(NIGHT_CHANNELS, NIGHT_HEADS, 0.1).train()
        steps['plan: H*W self-attention'] = (plan, lambda: plan(*maps.values()))

    def once(f, step):
        for p in [*f.parameters(), *maps.values()]: p.grad = None
        t, c = time.perf_counter(), time.process_time()
        step().mean().backward()
        return time.perf_counter() - t, time.process_time() - c
    for f, step in steps.values(): once(f, step)  # warm-up
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (f, step) in steps.items(): times[name].append(once(f, step))
    out = {name: {'median_s': statistics.median(w for w, c in t), 'min_s': min(w for w, c in t), 'cpu_median_s': statistics.median(c for w, c in t),
                  'params': sum(p.numel() for p in steps[name][0].parameters())} for name, t in times.items()}
    if plan_bytes > budget: out['plan: H*W self-attention'] = {'skipped': f"its attention scores alone need ~{plan_bytes / GiB:.0f} GiB > the {budget / GiB:.0f} GiB budget"}
    return out

def side_by_side_main(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    budget = 0.8 * mem_available()
    res = {}
    print(f"side by side: 3 modalities x {NIGHT_CHANNELS} ch, batch {SIDE_BATCH}, forward+backward, train mode, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    for level, size in SIDE_SIZES:
        r = res[f'{level} {size}x{size}'] = side_by_side(size, args.rounds, budget)
        default, plan = r['map_lean (default)'], r['plan: H*W self-attention']
        if 'median_s' in plan:
            r['plan_over_default'] = plan['median_s'] / default['median_s']
            r['plan_over_default_min'] = plan['min_s'] / default['min_s']  # the least disturbed passes of each
            r['plan_over_default_cpu'] = plan['cpu_median_s'] / default['cpu_median_s']  # CPU seconds: robust to waiting for cores
        r['attention_over_default'] = r['map_attention']['median_s'] / default['median_s']
        for name, v in r.items():
            if isinstance(v, dict): print(f"  {level} {size}x{size}  {name:28} " + (f"{v['median_s'] * 1e3:9.1f} ms (min {v['min_s'] * 1e3:.1f}, CPU {v['cpu_median_s'] * 1e3:.1f})" if 'median_s' in v else v['skipped']))
        print(f"  {level}: map_attention / default {r['attention_over_default']:.1f}x" + (f", plan / default {r['plan_over_default']:.1f}x" if 'plan_over_default' in r else ''), flush=True)
    p4, p3 = res['P4 40x40'], res['P3 80x80']
    res['goals'] = {'p4_default_at_least_50x_faster_than_plan': p4.get('plan_over_default', 0) >= 50,
                    'p3_default_under_1s': p3['map_lean (default)']['median_s'] < 1.0,
                    'p4_at_least_50x_on_min': p4.get('plan_over_default_min', 0) >= 50, 'p3_under_1s_on_min': p3['map_lean (default)']['min_s'] < 1.0}
    print(f"  goals: {res['goals']}")
    return res

def full_main(args):
    import torch
    budget = 0.8 * mem_available()
    t0 = time.time()
    print(f"mmfusion fusion benchmark: forward+backward, CPU, {args.threads} threads, torch {torch.__version__}, float32, train mode")
    print(f"peak memory = resident high-water mark of the first forward+backward in a fresh process minus the resident set before it;")
    print(f"time = median of {args.reps} further passes (P4, P3: 1); memory budget per case {budget / GiB:.1f} GiB (80% of available)")
    print("ratio = plan / ours (>1: the plan's design costs more); others = most CPU cores other processes used during the row's cases")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other processes on the machine would skew times)\n")

    print(f"(a) night detection fusion: 3 modalities x {NIGHT_CHANNELS} channels, {NIGHT_HEADS} heads, MLP x4, dropout 0.1, "
          f"plan batch {NIGHT_BATCH} (seed 000 Phase-3 config)")
    print("    ours = map_attention (attention across modalities per location); plan = seed 000 CrossModalAttention (self-attention over H*W)")
    head = f"    {'level':10} {'batch':>5}  {'ours time':>10} {'plan time':>10} {'ratio':>8}  {'ours mem':>11} {'plan mem':>11} {'ratio':>8} {'others':>6}"
    print(head)
    bytes_per_score = 20.0  # before any measurement: scores + softmax + dropout output + mask + their gradients
    notes = []
    for level, size in SIZES:
        plan_batch, plan = NIGHT_BATCH, None
        reps = args.reps if size <= 20 else 1  # P4/P3 passes take a minute or more: one timed pass
        est = lambda b: night_plan_scores(b, size) * bytes_per_score
        full_est = est(NIGHT_BATCH)
        while plan_batch > 1 and est(plan_batch) > budget: plan_batch = {12: 6, 6: 3, 3: 1}[plan_batch]
        while True:
            if est(plan_batch) > budget:
                notes.append(f"{level}: the plan's attention would not fit even at batch 1 (estimated {est(1) / GiB:.1f} GiB)")
                break
            plan = spawn('night_plan', plan_batch, size, reps, budget, args.threads)
            if plan['ok'] or plan_batch == 1: break
            notes.append(f"{level}: plan at batch {plan_batch} failed ({plan['error']}); halving")
            plan_batch = {12: 6, 6: 3, 3: 1}[plan_batch]
        if plan and plan['ok']: bytes_per_score = max(plan['peak_bytes'] / night_plan_scores(plan_batch, size), 1.0)
        if plan_batch != NIGHT_BATCH:
            notes.append(f"{level}: the plan at batch {NIGHT_BATCH} would need ~{full_est / GiB:.0f} GiB "
                         f"({night_plan_scores(NIGHT_BATCH, size) / 1e9:.1f} G attention scores x {bytes_per_score:.1f} B each, "
                         f"measured) > {budget / GiB:.1f} GiB budget: largest batch run = {plan_batch if plan and plan['ok'] else 'none'}")
        ours_full = spawn('night_ours', NIGHT_BATCH, size, reps, budget, args.threads)
        ours_same = ours_full if plan_batch == NIGHT_BATCH else spawn('night_ours', plan_batch, size, reps, budget, args.threads)
        if plan_batch != NIGHT_BATCH:
            print(f"    {level + f' {size}x{size}':10} {NIGHT_BATCH:>5}  {fmt_t(ours_full):>10} {'(OOM)':>10} {'':>8}  {fmt_m(ours_full):>11} {'(OOM)':>11} {'':>8} {fmt_busy(ours_full)}")
        print(f"    {level + f' {size}x{size}':10} {plan_batch:>5}  {fmt_t(ours_same):>10} {fmt_t(plan):>10} {ratio(ours_same, plan, 'time_s'):>8}  "
              f"{fmt_m(ours_same):>11} {fmt_m(plan):>11} {ratio(ours_same, plan, 'peak_bytes'):>8} {fmt_busy(ours_same, plan)}", flush=True)
    for n in notes: print('    note: ' + n)

    print(f"\n(b) weld classification fusion: hidden {WELD_HIDDEN}, {WELD_FUSION_TOKENS} fusion tokens, {WELD_HEADS} heads, batch {WELD_BATCH}, dropout 0.1")
    print("    tokens: " + ', '.join(f"{m} {n}x{d}" for m, (n, d) in WELD_TOKENS.items()))
    print("    ours = fusion_tokens (SDPA, masks; + per-modality MLP); plan = seed 001 module (nn.MultiheadAttention per modality)")
    print(f"    {'':10} {'batch':>5}  {'ours time':>10} {'plan time':>10} {'ratio':>8}  {'ours mem':>11} {'plan mem':>11} {'ratio':>8} {'others':>6}")
    ours, plan = (spawn(c, WELD_BATCH, 0, args.reps, budget, args.threads) for c in ('weld_ours', 'weld_plan'))
    print(f"    {'weld':10} {WELD_BATCH:>5}  {fmt_t(ours):>10} {fmt_t(plan):>10} {ratio(ours, plan, 'time_s'):>8}  "
          f"{fmt_m(ours):>11} {fmt_m(plan):>11} {ratio(ours, plan, 'peak_bytes'):>8} {fmt_busy(ours, plan)}")
    for name, r in (('ours', ours), ('plan', plan)):
        if not r['ok']: print(f"    note: {name} failed: {r['error']}")
        else: print(f"    {name}: {r['params'] / 1e6:.2f} M parameters")
    busy = max((r.get('other_cores', 0.) for r in RESULTS if r.get('ok')), default=0.)
    print(f"\ntotal {time.time() - t0:.0f} s; other processes used at most {busy:.2f} of {os.cpu_count()} CPU cores during any case")

def main(args):
    from provenance import provenance
    t0 = time.time()
    out = {'side_by_side': side_by_side_main(args)}
    if args.full:
        full_main(args)
        out['full'] = RESULTS
    from mmfusion.core import write_json
    recipe = {'modalities': NIGHT_MODS, 'channels': NIGHT_CHANNELS, 'batch': SIDE_BATCH, 'sizes': dict(SIDE_SIZES), 'fusions': SIDE_FUSIONS,
              'plan': f'seed 000 CrossModalAttention, {NIGHT_HEADS} heads, MLP x4, dropout 0.1', 'pass': 'forward+backward, train mode, float32',
              'rounds': args.rounds, 'threads': args.threads, 'base': 'thermal'}
    write_json({**provenance(recipe), **out, 'total_seconds': round(time.time() - t0, 1)}, args.out)
    print(f"wrote {args.out}")

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=5, help='side by side: timed rounds (one pass of each model per round)')
    ap.add_argument('--full', action='store_true', help="also the older per-process comparison with peak memory (slow: minutes per P3 case)")
    ap.add_argument('--out', default='benchmarks/results/fusion_bench.json')
    ap.add_argument('--reps', type=int, default=2, help='--full: timed passes after the first (P4 and P3: 1)')
    ap.add_argument('--threads', type=int, default=2, help='CPU threads')
    ap.add_argument('--case'); ap.add_argument('--batch', type=int); ap.add_argument('--size', type=int)
    ap.add_argument('--as-limit', type=int)
    args = ap.parse_args()
    child_main(args) if args.case else main(args)
