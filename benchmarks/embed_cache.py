"""Training on the embedding cache vs with the frozen encoder in the loop: weld sample data, real-size DINOv2-base.

Both runs train configs/weld.yaml with its angle-image encoder replaced by a frozen DINOv2-base at real size (random
weights from `REAL_CONFIGS`, bf16, shared over the five angles, attention over the angles trained), for the same epochs
from the same seed, in one invocation:
  - in the loop: every epoch reads the angle images as DINOv2's processor does (resize 256, crop 224) and runs DINOv2;
  - cached: `mmfusion embed` runs DINOv2 once over both splits (timed separately), then `data.embeddings` trains on it.
Nothing is augmented (weld.yaml has no augmentation), so the frozen inputs are the same every epoch; modality dropout
and the other draws come from the same seed in both runs. Per-epoch time = the Learner's fit time / epochs; the
held-out metrics of the two runs are compared.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/embed_cache.py [--epochs 2]
Writes benchmarks/results/embed_cache.json (date, commit, machine, recipe, both runs' times and metrics).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/embed_cache.py --weights-hash
measures instead what checking a cache's weights costs at real size: for each of the three encoders at its checkpoint's
architecture (random weights, fp32), the seconds to build it (`build_seeded`, what a config with `data.embeddings` does
once per cached modality when it is resolved) and to hash its weights (`state_hash`); writes benchmarks/results/weights_hash.json.
"""
import argparse, json, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'benchmarks'))
from provenance import provenance  # noqa: E402
from mmfusion.core import write_json  # noqa: E402
OUT = ROOT/'benchmarks'/'results'/'embed_cache.json'
HASH_OUT = ROOT/'benchmarks'/'results'/'weights_hash.json'


def weights_hash_cost():
    "Seconds to build each real-size encoder (random weights, fp32) and to hash its weights"
    from mmfusion.encoders import REAL_CONFIGS, build_seeded, state_hash
    rows = {}
    for name, config in REAL_CONFIGS.items():
        t0 = time.perf_counter(); enc = build_seeded({'name': name, 'config': config}); built = time.perf_counter() - t0
        t0 = time.perf_counter(); state_hash(enc); hashed = time.perf_counter() - t0
        sd = enc.state_dict()
        rows[name] = {'parameters_millions': round(sum(v.numel() for v in sd.values()) / 1e6, 1),
                      'megabytes': round(sum(v.numel() * v.element_size() for v in sd.values()) / 1e6), 'build_seconds': round(built, 2),
                      'hash_seconds': round(hashed, 2)}
        print(name, rows[name], flush=True)
        del enc, sd
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=2); ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--weights-hash', action='store_true', help='measure building + hashing the real-size encoders instead')
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    if a.weights_hash:
        rows = weights_hash_cost()
        write_json({**provenance({'command': ' '.join(['benchmarks/embed_cache.py'] + sys.argv[1:]),
                                  'encoders': 'REAL_CONFIGS, random weights, fp32, CPU', 'measured': 'build_seeded, then state_hash'}),
                    'encoders': rows}, HASH_OUT)
        print(f"wrote {HASH_OUT}"); return
    from mmfusion.encoders import REAL_CONFIGS
    from mmfusion.embed import embed
    from mmfusion.runs import train
    tmp = Path(tempfile.mkdtemp())
    dino = {'name': 'dinov2', 'config': REAL_CONFIGS['dinov2'], 'freeze': True, 'dtype': 'bfloat16'}
    base = [f'data.root={ROOT/"data"}', f'runs_dir={tmp/"runs"}', f'training.epochs={a.epochs}', 'training.progress=false',
            'training.tensorboard=false', 'model.encoders.images=' + json.dumps({'name': 'image_set', 'encoder': dino, 'aggregation': 'attention'})]
    cfg = ROOT/'configs'/'weld.yaml'
    t0 = time.perf_counter()
    index = embed(cfg, tmp/'cache', base, device='cpu', batch_size=24, progress=False)
    embed_s = time.perf_counter() - t0
    cached = train(cfg, [*base, f'data.embeddings={tmp/"cache"}'], verbose=False)
    loop = train(cfg, base, verbose=False)
    per_epoch = {k: r.metrics['train_seconds'] / r.metrics['epochs'] for k, r in (('in_loop', loop), ('cached', cached))}
    diffs = {k: abs(loop.metrics['test'][k] - cached.metrics['test'][k]) for k in loop.metrics['test']}
    loss = {k: [round(h['train_loss'], 5) for h in r.history] for k, r in (('in_loop', loop), ('cached', cached))}
    res = {**provenance({'command': ' '.join(['benchmarks/embed_cache.py'] + sys.argv[1:]), 'config': 'configs/weld.yaml',
                         'images': 'image_set(DINOv2-base real size, random weights, bf16, frozen)',
                         'runs': 'same seed and epochs for both runs, no augmentation'}),
           'epochs': a.epochs, 'embed_seconds': round(embed_s, 1), 'embedded_rows': index['modalities']['images']['rows'],
           'seconds_per_epoch': {k: round(v, 2) for k, v in per_epoch.items()}, 'speedup': round(per_epoch['in_loop'] / per_epoch['cached'], 1),
           'train_loss': loss, 'test_metrics': {'in_loop': loop.metrics['test'], 'cached': cached.metrics['test']},
           'max_abs_metric_difference': max(diffs.values()), 'metric_differences': diffs}
    write_json(res, OUT)
    print(json.dumps({k: res[k] for k in ('embed_seconds', 'seconds_per_epoch', 'speedup', 'max_abs_metric_difference')}), f"\nwrote {OUT}")


if __name__ == '__main__': main()
