"""Night person detection benchmark (not in CI; under half an hour on 2 CPU cores): the fused YOLO against a trained detector per modality.

Data: the shipped night set (data/night), built so that every modality alone is ambiguous (data/night/README.md).
Equal budget, one recipe (configs/night_person.yaml, run by `mmfusion.detection.run_detection`):
  1. E epochs of ultralytics' own trainer (mosaic, EMA, warmup) on one modality, YOLO11n from scratch, for each of
     thermal, nvg and visual_enhanced (`train_single_detector`, Phase 1);
  2. F epochs of mmfusion's Learner with the config's fine-tuning recipe (AdamW, cosine, best checkpoint by validation
     mAP50-95, epoch 0 = the start):
       - each single-modality detector fine-tuned from its own Phase-1 weights;
       - the fused detector (three backbones initialised from the thermal Phase-1 weights, spatial modality attention at
         P3/P4/P5, base = thermal, so step 0 = the thermal detector exactly).
Every model is scored on the test split by `validate_detection` (ultralytics' NMS, matching and DetMetrics); the fused one also
with each modality removed at test time (the ablation). Headline: mAP50-95. A single modality's score is the better of its two
phases on test (the stricter comparison for the fused model). "Clearly below" = at least --margin mAP50-95 below the fused model.
A metric check replays the thermal Phase-1 model's own `yolo val` predictions through `validate_detection`: identical numbers.
The recipe (Phase-1 epochs and batch, fine-tuning epochs, image size) is the config's (configs/night_person.yaml); an
option given on the command line overrides it, and the JSON records the recipe used, with date, commit and machine.
Writes benchmarks/results/night_detection.json (atomically); the runs go under runs/bench/night_detection/.

--fusions A B compares map fusions instead (benchmarks/results/night_fusion_quality.json): each fused detector starts
from the same thermal Phase-1 weights (--phase1, e.g. the full run's; trained once when absent) and is fine-tuned with
the config's recipe; test mAP50-95 with a percentile bootstrap interval over images, and the paired difference A - B.
--reuse-phase1 starts each modality from the Phase-1 weights a previous full run left under --work (only the fine-tuning
phases and the evaluation run again; the JSON's recipe names the weights and its phase-1 seconds are the reuse's).
Run: .venv/bin/python benchmarks/night_detection.py [--epochs E] [--finetune F] [--imgsz S] [--batch B] [--reuse-phase1]
     .venv/bin/python benchmarks/night_detection.py --fusions map_lean map_attention
"""
from __future__ import annotations
import argparse, csv, json, time, warnings
from pathlib import Path

import numpy as np, torch, torch.nn as nn, yaml

from mmfusion.detection import (detection_config, detection_metrics, detection_splits, metric_difference, ultralytics_offline, run_detection,
                                validate_detection, yolo_dataset_view)
from mmfusion.evaluation import bootstrap_ci
from mmfusion.core import write_json
from provenance import provenance

COLUMNS = ('precision', 'recall', 'mAP50', 'mAP50-95')
HEADLINE = 'mAP50-95'
FUSION_SETTINGS = {'map_attention': {'name': 'map_attention', 'n_heads': 4}}  # name -> the fusion config compared (default: {'name': name})


def ultralytics_replay_check(pt:Path, data_yaml:Path, imgsz:int) -> dict:
    "`yolo val` on the test split, and `validate_detection` on exactly the predictions and labels ultralytics' validator saw"
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionValidator
    seen, outs = [], []

    class Recording(DetectionValidator):
        def update_metrics(self, preds, batch):
            seen.append({'target': {k: batch[k].clone() for k in ('batch_idx', 'cls', 'bboxes')}, 'shape': tuple(batch['img'].shape),
                         'ids': [Path(f).name for f in batch['im_file']]})
            super().update_metrics(preds, batch)

    yolo = YOLO(str(pt))
    yolo.model.model[-1].register_forward_hook(lambda m, i, o: outs.append(o))
    with ultralytics_offline():
        res = yolo.val(validator=Recording, data=str(data_yaml), split='test', imgsz=imgsz, batch=8, device='cpu', plots=False, workers=0,
                       project=str(Path(data_yaml).parent.resolve()), name='yolo_val', exist_ok=True)
    replayed = iter(outs[len(outs) - len(seen):])  # the last forward passes are the validation batches (earlier ones: warm-up)

    class Replay(nn.Module):
        def __init__(self): super().__init__(); self.w, self.names = nn.Parameter(torch.zeros(1)), {0: 'person'}
        def forward(self, batch): return next(replayed)

    batches = [{'inputs': {'thermal': torch.zeros(b['shape'])}, 'present': torch.ones(b['shape'][0], 1, dtype=torch.bool),
                'modalities': ['thermal'], 'target': b['target'], 'ids': b['ids']} for b in seen]
    ours = validate_detection(Replay(), batches)
    theirs = {k: res.results_dict[f'metrics/{k}(B)'] for k in COLUMNS}
    return {'ultralytics_val': theirs, 'validate_detection': {k: ours[k] for k in COLUMNS},
            'identical': all(ours[k] == theirs[k] for k in COLUMNS)}


def data_facts(root:Path) -> dict:
    "Frames and labelled persons per split, and the test split's decoys (from objects.csv when the set has one)"
    out = {f'{s}_frames': len(list((root/s/'labels').glob('*.txt'))) for s in ('train', 'val', 'test')}
    out['test_persons'] = sum(sum(1 for line in f.read_text().splitlines() if line.strip()) for f in (root/'test'/'labels').glob('*.txt'))
    if (root/'objects.csv').is_file():
        rows = [r for r in csv.DictReader((root/'objects.csv').open()) if r['split'] == 'test']
        out['test_decoys'] = sum(r['person'] == '0' for r in rows)
        out['test_objects_by_kind'] = {k: sum(r['kind'] == k for r in rows) for k in sorted({r['kind'] for r in rows})}
    return out


def recipe_of(a, cfg:dict) -> dict:
    "The recipe run: the config's Phase-1 and fine-tuning settings, each overridden by its command-line option when given"
    b, d, t = cfg['baseline'], cfg['data'], cfg['training']
    return {'config': a.config, 'model': b['model'], 'imgsz': a.imgsz or d['imgsz'], 'phase1_epochs': a.epochs or b['epochs'],
            'batch': a.batch or b['batch'] or d['batch_size'], 'finetune_epochs': a.finetune or t['epochs'], 'ultralytics': dict(b['ultralytics']),
            'fusion': cfg['model']['fusion'], 'seed': cfg['seed']}


def overrides_of(a, r:dict) -> dict:
    "The config overrides that run recipe `r` on --root (the dataset folder itself)"
    return {'data': {'root': a.root, 'sample': None, 'imgsz': r['imgsz'], 'batch_size': r['batch']},
            'baseline': {'modality': 'thermal', 'modalities': ['thermal', 'nvg', 'visual_enhanced'], 'finetune': True, 'weights': None,
                         'epochs': r['phase1_epochs'], 'batch': r['batch'], 'ultralytics': {**r['ultralytics'], 'nbs': r['batch']}},
            'training': {'epochs': r['finetune_epochs'], 'progress': False}}


def compare_fusions(a, r:dict) -> dict:
    "Each of --fusions fine-tuned from the same thermal Phase 1; test mAP50-95 with bootstrap intervals, and the paired difference of the first two"
    phase1 = a.phase1 if a.phase1 and Path(a.phase1).is_file() else None
    out, records, names = {}, {}, None
    for name in a.fusions:
        o = overrides_of(a, r)
        o['baseline'].update({'modalities': [], 'finetune': False, 'weights': phase1})  # no single-modality baselines: the fusions are compared
        o['model'] = {'fusion': FUSION_SETTINGS.get(name, {'name': name})}
        o['gate'] = None
        t = time.perf_counter()
        run = run_detection(a.config, o, Path(a.work)/'fusions'/name)
        phase1 = phase1 or str(run.baseline)  # the first run trained it: the others reuse it
        cfg = yaml.safe_load((run.dir/'config.yaml').read_text())
        test = detection_splits(a.root, r['imgsz'], run.model.channels, splits=('test',), class_names=list(run.model.names.values()))['test']
        res = validate_detection(run.model, test.loader(r['batch']), **{k: cfg['evaluation'][k] for k in ('conf', 'iou', 'max_det')}, per_image=True)
        records[name], names = res.pop('per_image'), run.model.names
        ci = bootstrap_ci(lambda idx: detection_metrics([records[name][i] for i in idx], names)[HEADLINE], np.arange(len(records[name])), n_boot=a.n_boot)
        recorded = json.loads((run.dir/'metrics.json').read_text())
        out[name] = {'fusion': o['model']['fusion'], 'test': {k: res[k] for k in COLUMNS}, 'images': res['images'],
                     f'{HEADLINE}_ci': [ci['low'], ci['high']], 'fused_table': {k: {c: float(v[c]) for c in COLUMNS} for k, v in run.table.to_dict('index').items()},
                     'finetune_seconds': recorded['seconds']['fused finetune'], 'seconds': round(time.perf_counter() - t, 1), 'run': str(run.dir)}
        print(f"{name}: test {HEADLINE} {res[HEADLINE]:.3f} (95% CI {ci['low']:.3f} to {ci['high']:.3f}), fine-tuning {out[name]['finetune_seconds']:.0f}s")
    first, second = a.fusions[:2]
    d = metric_difference(records[first], records[second], names, HEADLINE, n_boot=a.n_boot)
    return {'phase1': phase1, 'split': 'test', 'headline_metric': HEADLINE, 'fusions': out,
            'difference': {'a': first, 'b': second, 'value': d['value'], 'ci': [d['low'], d['high']], 'n_boot': a.n_boot,
                           'a_at_least_b_within_ci': d['high'] >= 0}}  # a is not surely worse than b


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--root', default='data/night')
    p.add_argument('--config', default='configs/night_person.yaml')
    p.add_argument('--epochs', type=int, default=None, help="phase 1: epochs of ultralytics' trainer for each single modality (default: the config's baseline.epochs)")
    p.add_argument('--finetune', type=int, default=None, help="phase 2: epochs of the Learner for every model (default: the config's training.epochs)")
    p.add_argument('--imgsz', type=int, default=None, help="default: the config's data.imgsz")
    p.add_argument('--batch', type=int, default=None, help="batch size of both phases (ultralytics' nbs too: one optimizer step per batch); default: the config's baseline.batch")
    p.add_argument('--margin', type=float, default=0.05, help="'clearly below': at least this much mAP50-95 under the fused model")
    p.add_argument('--fusions', nargs='+', default=None, help="compare these map fusions (e.g. map_lean map_attention) instead of the full benchmark")
    p.add_argument('--phase1', default='runs/bench/night_detection/baseline/thermal/weights/best.pt', help="--fusions: the thermal Phase-1 .pt to start from (trained when absent)")
    p.add_argument('--n-boot', type=int, default=1000, help="--fusions: bootstrap resamples")
    p.add_argument('--reuse-phase1', action='store_true', help="start every modality from the Phase-1 .pt a previous run left in --work/baseline/ (skips phase 1)")
    p.add_argument('--work', default='runs/bench/night_detection')
    p.add_argument('--out', default=None, help="default: benchmarks/results/night_detection.json (night_fusion_quality.json with --fusions)")
    a = p.parse_args()
    warnings.filterwarnings('ignore', message='The image is already gray')
    t_all = time.perf_counter()
    r = recipe_of(a, detection_config(a.config, {'data': {'root': a.root, 'sample': None}}))
    if a.fusions:
        out = a.out or 'benchmarks/results/night_fusion_quality.json'
        result = {**provenance({**r, 'fusions': a.fusions, 'phase1': a.phase1}), **compare_fusions(a, r), 'total_seconds': round(time.perf_counter() - t_all, 1)}
        write_json(result, out)
        d = result['difference']
        print(f"{d['a']} - {d['b']}: {d['value']:+.3f} {HEADLINE} (95% CI {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}); wrote {out}")
        return
    out = a.out or 'benchmarks/results/night_detection.json'
    o = overrides_of(a, r)
    if a.reuse_phase1:
        o['baseline']['weights'] = {m: str(Path(a.work)/'baseline'/m/'weights'/'best.pt') for m in o['baseline']['modalities']}
        missing = [w for w in o['baseline']['weights'].values() if not Path(w).is_file()]
        if missing: raise SystemExit(f"--reuse-phase1: no Phase-1 weights at {', '.join(missing)}; run once without it")
        r['phase1_reused_from'] = o['baseline']['weights']
    run = run_detection(a.config, o, Path(a.work)/'reused' if a.reuse_phase1 else a.work)
    best = lambda x: max((x['test'], x.get('phase1_test') or x['test']), key=lambda v: v[HEADLINE])  # the better phase on test
    single = {m: {'test': x['test'], 'phase1_test': x.get('phase1_test'), 'best_phase_test': best(x),
                  'phase1_seconds': x['phase1_seconds'], 'finetune_seconds': x['finetune_seconds']} for m, x in run.baselines.items()}
    table = {row: {k: float(v) for k, v in vals.items()} for row, vals in run.table.to_dict('index').items()}
    fused = table['fused: all modalities']
    margins = {m: fused[HEADLINE] - s['best_phase_test'][HEADLINE] for m, s in single.items()}
    recorded = json.loads((run.dir/'metrics.json').read_text())
    seconds = recorded['seconds']
    result = {
        **provenance({**r, 'finetune_recipe': yaml.safe_load((run.dir/'config.yaml').read_text())['training']}),
        'headline_metric': HEADLINE, 'split': 'test',
        'settings': {'imgsz': r['imgsz'], 'phase1_epochs': r['phase1_epochs'], 'finetune_epochs': r['finetune_epochs'], 'batch': r['batch'], 'model': r['model'],
                     'threads': torch.get_num_threads(), 'clear_margin': a.margin, 'config': a.config,
                     'finetune_recipe': yaml.safe_load((run.dir/'config.yaml').read_text())['training']},
        'data': {'root': a.root, **data_facts(Path(a.root))},
        'single': single,
        'fused': {'test': fused, 'start_on_validation': {k: run.history[0][f'valid_{k}'] for k in COLUMNS}, 'finetune_seconds': seconds['fused finetune']},
        'fused_table': table,
        'margins': margins,
        'fused_clearly_above_every_single': all(v >= a.margin for v in margins.values()),
        'seconds': seconds,
        'gate': recorded['gate'],  # the config's Phase-1 gate: the thermal Phase 1 scored on val, and whether the fused phase was allowed to start
    }
    result['metric_check'] = ultralytics_replay_check(Path(run.baselines['thermal']['phase1']),
                                                      yolo_dataset_view(a.root, 'thermal', Path(a.work)/'check_view'), r['imgsz'])
    result['total_seconds'] = round(time.perf_counter() - t_all, 1)
    write_json(result, out)
    print(run.table.round(3).to_string())
    print('\n'.join(f"{m:>16} only (best phase): " + '  '.join(f"{k} {s['best_phase_test'][k]:.3f}" for k in COLUMNS) + f"   fused - it: {margins[m]:+.3f} {HEADLINE}"
                    for m, s in single.items()))
    print(f"fused clearly (>= {a.margin}) above every single modality on {HEADLINE}: {result['fused_clearly_above_every_single']}; "
          f"metric check identical to yolo val: {result['metric_check']['identical']}; total {result['total_seconds']:.0f}s; wrote {out}")


if __name__ == '__main__':
    main()
