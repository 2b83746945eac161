"""Battery segmentation benchmark (not in CI; about 10 minutes on 2 CPU cores): does fusing CT with the density map beat
the best single modality, and what does the plan's two-stage schedule do?

Data: the shipped battery segmentation set (data/battery_seg; see its README): 64x64 crops, 4 classes (background, casing,
electrode, defect), CT + an aligned density map, batteries kept whole per split, three 192x192 scans.

1. Ceilings (the benchmarks/ceilings.py pattern): a per-pixel classifier (scikit-learn's histogram gradient boosting) on
   hand-crafted local features (the pixel and Gaussian blurs at 1, 2, 4, 8 px, local minimum and standard deviation) of
   CT alone, of the density map alone and of both, fitted on train + val pixels (subsampled), scored on the test crops:
   mIoU and per-class IoU. What a simple model can get from each modality.
2. Trained models, one recipe (configs/inspection_segmentation.yaml, run by `mmfusion.segmentation.run_segmentation`,
   all in this one process): a CT-only and a density-only DeepLabV3+ (MobileNetV3-small), `baseline.epochs` (12) each,
   then the fused model started from the CT model (baseline-first) and trained `training.epochs` (16) more: same
   optimiser, schedule, loss, augmentation and data, but the fused model sees 12 + 16 epochs. The schedules below
   include the fused model trained from scratch for 16 epochs alone (joint_from_scratch), the like-for-like check. Test mIoU with a bootstrap interval over images, and the paired difference between
   the fused model and the best single-modality model (the claim the tutorial states).
3. The plan's schedule, checked: the fused model trained (a) jointly from scratch, (b) two-stage from scratch (backbones
   frozen for the first stage: frozen *random* backbones), (c) two-stage from the CT baseline (frozen *trained* backbones).
   Per stage, the best validation mIoU, against all background and the best constant prediction (one class everywhere).

Writes benchmarks/results/segmentation.json (atomically; date, commit, machine, recipe) and the ceilings section of
data/battery_seg/README.md (below `mmfusion.sample_data.SEGMENTATION_CEILINGS_MARK`).
Run: .venv/bin/python benchmarks/segmentation.py [--config configs/inspection_segmentation.yaml] [--skip-schedules]
     .venv/bin/python benchmarks/segmentation.py --readme-only   (rewrite the README section from the JSON)
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, subprocess, time, warnings
from pathlib import Path

import cv2, numpy as np, torch
from scipy.ndimage import minimum_filter, uniform_filter
from sklearn.ensemble import HistGradientBoostingClassifier

from mmfusion.core import write_json, write_text_atomic
from mmfusion.sample_data import SEGMENTATION_CEILINGS_MARK
from mmfusion.segmentation import (best_constant, confusion, load_segmenter, run_segmentation, run_splits, score_segmenter, segmentation_config,
                                   pooled_miou, segmentation_scores)
from mmfusion.evaluation import bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/'benchmarks'/'results'/'segmentation.json'
SEED = 0


def provenance(recipe:dict) -> dict:
    "When, on which commit, on what machine, with which recipe"
    git = lambda *a: subprocess.run(['git', *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'commit': git('rev-parse', 'HEAD') or None,
            'uncommitted_changes': bool(git('status', '--porcelain', '--', 'mmfusion', 'benchmarks', 'configs')),
            'machine': {'cpu_cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(), 'load_average_1min': round(os.getloadavg()[0], 2),
                        'platform': platform.platform(), 'torch': torch.__version__}, 'recipe': recipe}


# ---------------------------------------------------------------- 1. ceilings
def pixel_features(img:np.ndarray) -> np.ndarray:
    "(H*W, F) local features of one grey image in [0, 1]"
    f = [img] + [cv2.GaussianBlur(img, (0, 0), s) for s in (1, 2, 4, 8)]
    f += [minimum_filter(img, 5), minimum_filter(img, 9)]
    f += [np.sqrt(np.maximum(uniform_filter(img**2, 5) - uniform_filter(img, 5)**2, 0))]
    return np.stack(f, -1).reshape(-1, len(f))


def ceilings(splits:dict, names:list, per_image:int=600) -> dict:
    "Per-pixel gradient boosting on CT / density / both: test mIoU and per-class IoU"
    rng = np.random.default_rng(SEED)
    def table(ds, take):
        X, y = {'ct': [], 'density': []}, []
        for i in range(len(ds)):
            s = ds.read(i)
            t = s.target.numpy().ravel()
            idx = rng.choice(len(t), min(per_image, len(t)), replace=False) if take else np.arange(len(t))
            for m in X: X[m].append(pixel_features(s.inputs[m][0].numpy())[idx])
            y.append(t[idx])
        return {m: np.concatenate(v) for m, v in X.items()}, np.concatenate(y)
    Xtr, ytr = [table(splits[s], True) for s in ('train', 'val')], None
    Xtr, ytr = {m: np.concatenate([x[0][m] for x in Xtr]) for m in ('ct', 'density')}, np.concatenate([x[1] for x in Xtr])
    Xte, yte = table(splits['test'], False)
    out = {}
    for name, mods in {'ct': ['ct'], 'density': ['density'], 'ct+density': ['ct', 'density']}.items():
        clf = HistGradientBoostingClassifier(max_iter=150, random_state=SEED).fit(np.concatenate([Xtr[m] for m in mods], 1), ytr)
        pred = clf.predict(np.concatenate([Xte[m] for m in mods], 1))
        sc = segmentation_scores(confusion(pred, yte, len(names)), names)
        out[name] = {'miou': sc['miou'], 'per_class_iou': {c: v['iou'] for c, v in sc['per_class'].items()}}
    return {'model': 'per-pixel HistGradientBoostingClassifier on local features (pixel, blurs at 1/2/4/8 px, 5/9 px minimum, 5 px std)',
            'fitted_on': 'train + val pixels (%d per crop)' % per_image, 'scored_on': 'every test pixel', 'subsets': out}


# ---------------------------------------------------------------- 2. + 3. trained models
def paired(a:np.ndarray, b:np.ndarray, n_boot:int=2000) -> dict:
    "mIoU(a) - mIoU(b) on the same images with a paired percentile bootstrap interval over images"
    ci = bootstrap_ci(lambda x, y: pooled_miou(x) - pooled_miou(y), a, b, n_boot=n_boot, seed=SEED)
    return {'difference': ci['value'], 'low': ci['low'], 'high': ci['high']}


def stage_summary(history:list, floors:dict) -> dict:
    "Per stage (or the whole run): best validation mIoU, epochs; with the validation split's all-background and best-constant mIoU"
    out = {}
    for r in history:
        k = str(r.get('stage', 'all'))
        o = out.setdefault(k, {'epochs': 0, 'best_valid_miou': None})
        o['epochs'] += 1
        if r.get('valid_miou') is not None: o['best_valid_miou'] = max(o['best_valid_miou'] or 0, r['valid_miou'])
    return {'stages': out, **floors}


def main(config:str, skip_schedules:bool=False):
    t0 = time.perf_counter()
    cfg = segmentation_config(config)
    runs = ROOT/'runs'/'bench'/'segmentation'
    splits = run_splits(cfg)
    names = cfg['data']['class_names']
    print('ceilings ...', flush=True)
    ceil = ceilings(splits, names)
    print(json.dumps({k: round(v['miou'], 3) for k, v in ceil['subsets'].items()}), flush=True)
    main_run = run_segmentation(config, [f'runs_dir={runs}', 'training.progress=false', 'name=main'], verbose=True)
    m = main_run.metrics
    test = run_splits(cfg, names=[cfg['data']['test']])[cfg['data']['test']]
    ev = cfg['evaluation']
    kw = dict(window=ev['window'], overlap=ev['overlap'], blend=ev['blend'])
    cms = {'fused': score_segmenter(main_run.model, test, **kw)}
    for mod, rec in m['baselines'].items(): cms[mod] = score_segmenter(load_segmenter(main_run.dir/rec['checkpoint']), test, **kw)
    best = max(m['baselines'], key=lambda k: m['table'][f'{k} only (baseline)']['miou'])
    valid = run_splits(cfg, names=[cfg['data']['valid']])[cfg['data']['valid']]
    vcms = np.stack([confusion(torch.zeros_like(valid[i].target), valid[i].target, len(names)) for i in range(len(valid))])  # rows: the truth
    k, const = best_constant(vcms)
    floors = {'valid_all_background_miou': segmentation_scores(vcms.sum(0))['miou'], 'valid_best_constant': names[k], 'valid_best_constant_miou': const}
    result = {**provenance({'config': config, 'resolved': cfg}), 'ceilings': ceil,
              'main': {'run': str(main_run.dir.relative_to(ROOT)), 'seconds': m['seconds'], 'table': m['table'], 'scans': m.get('scans'),
                       'best_single': best, 'fused_minus_best_single': paired(cms['fused'], cms[best]),
                       'history': stage_summary(m['history'], floors)}}
    result['claims'] = {'fused_beats_best_single': result['main']['fused_minus_best_single']['low'] > 0}
    if not skip_schedules:
        ct = (main_run.dir/m['baselines']['ct']['checkpoint']).resolve()
        stages = [{'epochs': 5, 'freeze': ['backbones.*'], 'name': 'frozen backbones'}, {'epochs': cfg['training']['epochs'] - 5, 'unfreeze': ['*'], 'lr': 1e-3, 'name': 'fine-tune'}]
        variants = {'joint_from_scratch': ['model.init=none'],
                    'two_stage_from_scratch': ['model.init=none', f'training.stages={json.dumps(stages)}'],
                    'two_stage_from_ct_baseline': [f'training.stages={json.dumps(stages)}']}
        result['schedules'] = {}
        for name, ov in variants.items():
            print(name, '...', flush=True)
            r = run_segmentation(config, [f'runs_dir={runs}', f'name={name}', 'training.progress=false', 'baseline.modalities=[ct]',
                                          f'baseline.weights={{ct: {ct}}}', *ov], verbose=True)  # the main run's CT model, reused (not retrained)
            result['schedules'][name] = {'run': str(r.dir.relative_to(ROOT)), 'overrides': ov, 'test_miou': r.metrics['headline'],
                                         'per_class_iou': {c: v['iou'] for c, v in r.metrics['metrics']['per_class'].items()},
                                         'history': stage_summary(r.history, floors), 'seconds': r.metrics['seconds']}
    result['seconds'] = round(time.perf_counter() - t0, 1)
    write_json(result, OUT)
    write_readme(result)
    print(f"wrote {OUT} ({result['seconds']} s)")


def render(result:dict) -> str:
    "The README's ceilings section, from the JSON"
    c, mn = result['ceilings']['subsets'], result['main']
    cls = list(next(iter(c.values()))['per_class_iou'])
    row = lambda name, miou, per: f"| {name} | {miou:.3f} | " + ' | '.join('-' if per[k] is None else f'{per[k]:.3f}' for k in cls) + ' |'
    lines = [f"Measured by `benchmarks/segmentation.py` on {result['date'][:10]} (commit {str(result['commit'])[:8]}); test split, mIoU and IoU per class.",
             '', f"| model | mIoU | " + ' | '.join(cls) + ' |', '|---|---|' + '---|' * len(cls)]
    lines += [row(f'per-pixel ceiling: {k}', v['miou'], v['per_class_iou']) for k, v in c.items()]
    for k, v in mn['table'].items(): lines.append(row(f'trained: {k}', v['miou'], {n: p['iou'] for n, p in v['per_class'].items()}))
    d = mn['fused_minus_best_single']
    lines += ['', f"The fused model minus the best single-modality model ({mn['best_single']} only): {d['difference']:+.3f} mIoU "
              f"(95% paired bootstrap interval over test images {d['low']:+.3f} to {d['high']:+.3f})."]
    return '\n'.join(lines) + '\n'


def write_readme(result:dict, root:Path=ROOT/'data'/'battery_seg'):
    p = root/'README.md'
    head = p.read_text().split(SEGMENTATION_CEILINGS_MARK)[0]
    write_text_atomic(p, head + SEGMENTATION_CEILINGS_MARK + '\n' + render(result))


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--config', default='configs/inspection_segmentation.yaml')
    ap.add_argument('--skip-schedules', action='store_true', help='only the ceilings and the main run')
    ap.add_argument('--readme-only', action='store_true', help='rewrite data/battery_seg/README.md from the JSON')
    a = ap.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
    if a.readme_only: write_readme(json.loads(OUT.read_text()))
    else: main(a.config, a.skip_schedules)
