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
Writes benchmarks/results/night_detection.json (atomically); the runs go under runs/bench/night_detection/.
Run: .venv/bin/python benchmarks/night_detection.py [--epochs 40] [--finetune 20] [--imgsz 160] [--batch 8]
"""
from __future__ import annotations
import argparse, csv, json, time, warnings
from pathlib import Path

import torch, torch.nn as nn, yaml

from mmfusion.detection import ultralytics_offline, run_detection, validate_detection, yolo_dataset_view
from mmfusion.core import write_json

COLUMNS = ('precision', 'recall', 'mAP50', 'mAP50-95')
HEADLINE = 'mAP50-95'


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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--root', default='data/night')
    p.add_argument('--config', default='configs/night_person.yaml')
    p.add_argument('--epochs', type=int, default=40, help="phase 1: epochs of ultralytics' trainer for each single modality")
    p.add_argument('--finetune', type=int, default=20, help="phase 2: epochs of the Learner for every model")
    p.add_argument('--imgsz', type=int, default=160)
    p.add_argument('--batch', type=int, default=8, help="batch size of both phases (ultralytics' nbs too: one optimizer step per batch)")
    p.add_argument('--margin', type=float, default=0.05, help="'clearly below': at least this much mAP50-95 under the fused model")
    p.add_argument('--work', default='runs/bench/night_detection')
    p.add_argument('--out', default='benchmarks/results/night_detection.json')
    a = p.parse_args()
    warnings.filterwarnings('ignore', message='The image is already gray')
    t_all = time.perf_counter()
    overrides = {'data': {'root': a.root, 'sample': None, 'imgsz': a.imgsz, 'batch_size': a.batch},  # --root is the dataset folder itself
                 'baseline': {'modality': 'thermal', 'modalities': ['thermal', 'nvg', 'visual_enhanced'], 'finetune': True, 'weights': None,
                              'epochs': a.epochs, 'batch': a.batch, 'ultralytics': {'nbs': a.batch}},
                 'training': {'epochs': a.finetune, 'progress': False}}
    run = run_detection(a.config, overrides, a.work)
    best = lambda r: max((r['test'], r.get('phase1_test') or r['test']), key=lambda x: x[HEADLINE])  # the better phase on test
    single = {m: {'test': r['test'], 'phase1_test': r.get('phase1_test'), 'best_phase_test': best(r),
                  'phase1_seconds': r['phase1_seconds'], 'finetune_seconds': r['finetune_seconds']} for m, r in run.baselines.items()}
    table = {row: {k: float(v) for k, v in vals.items()} for row, vals in run.table.to_dict('index').items()}
    fused = table['fused: all modalities']
    margins = {m: fused[HEADLINE] - s['best_phase_test'][HEADLINE] for m, s in single.items()}
    recorded = json.loads((run.dir/'metrics.json').read_text())
    seconds = recorded['seconds']
    result = {
        'headline_metric': HEADLINE, 'split': 'test',
        'settings': {'imgsz': a.imgsz, 'phase1_epochs': a.epochs, 'finetune_epochs': a.finetune, 'batch': a.batch, 'model': 'yolo11n.yaml',
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
                                                      yolo_dataset_view(a.root, 'thermal', Path(a.work)/'check_view'), a.imgsz)
    result['total_seconds'] = round(time.perf_counter() - t_all, 1)
    write_json(result, a.out)
    print(run.table.round(3).to_string())
    print('\n'.join(f"{m:>16} only (best phase): " + '  '.join(f"{k} {s['best_phase_test'][k]:.3f}" for k in COLUMNS) + f"   fused - it: {margins[m]:+.3f} {HEADLINE}"
                    for m, s in single.items()))
    print(f"fused clearly (>= {a.margin}) above every single modality on {HEADLINE}: {result['fused_clearly_above_every_single']}; "
          f"metric check identical to yolo val: {result['metric_check']['identical']}; total {result['total_seconds']:.0f}s; wrote {a.out}")


if __name__ == '__main__':
    main()
