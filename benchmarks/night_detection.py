"""Night person detection benchmark (not in CI; about half an hour on 2 CPU cores): fused YOLO against every single modality.

Data: the shipped sample night set (data/night: 160x128 frames, train 42 / val 9 / test 9), at 320 px (320x256).
Equal budget: every model sees the training split for E + F epochs (default 40 + 20), in two phases:
  1. E epochs of ultralytics' own trainer (its full recipe: mosaic, EMA, warmup) on one modality, YOLO11n from scratch,
     for each of thermal, nvg and visual_enhanced (the plan's Phase 1);
  2. F epochs of mmfusion's Learner with configs/night_person.yaml's fine-tuning recipe (AdamW lr 1e-4, cosine, best
     checkpoint by validation mAP50-95):
       - each single-modality model fine-tuned from its own Phase-1 weights (one modality, no fusion);
       - the fused model: three YOLO11n backbones initialised from the thermal Phase-1 weights, spatial modality attention
         at P3/P4/P5 with base = thermal (step 0 = the thermal model exactly), ultralytics' neck + Detect (`run_detection`).
Every model is scored on the test split by `validate_detection` (ultralytics' NMS, matching and DetMetrics at 320 px), the
fused one also with each modality removed at test time. "Best single modality" is the best single-modality score of either
phase, per metric. A metric check replays the thermal Phase-1 model's own `yolo val` predictions through `validate_detection`:
the numbers must be identical to ultralytics'.
Writes runs/bench/night_detection.json (and the runs under runs/bench/night_detection/).
Run: .venv/bin/python benchmarks/night_detection.py [--epochs 40] [--finetune 20] [--imgsz 320]
"""
from __future__ import annotations
import argparse, json, time, warnings
from pathlib import Path

import torch, torch.nn as nn, yaml

from mmfusion.data import NIGHT_MODALITIES
from mmfusion.detection import (MultiModalYOLO, _ultralytics_offline, detection_splits, fit_detector, run_detection, train_baseline,
                                validate_detection, yolo_dataset_view)

COLUMNS = ('precision', 'recall', 'mAP50', 'mAP50-95')


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
    with _ultralytics_offline():
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--root', default='data/night')
    p.add_argument('--epochs', type=int, default=40, help="phase 1: epochs of ultralytics' trainer for each single modality")
    p.add_argument('--finetune', type=int, default=20, help="phase 2: epochs of the Learner for every model")
    p.add_argument('--imgsz', type=int, default=320)
    p.add_argument('--config', default='configs/night_person.yaml')
    p.add_argument('--out', default='runs/bench/night_detection.json')
    a = p.parse_args()
    warnings.filterwarnings('ignore', message='The image is already gray')
    out = Path(a.out)
    work = out.with_suffix('')
    recipe = yaml.safe_load(Path(a.config).read_text())['training']
    test_dl = detection_splits(a.root, a.imgsz, augment=False, splits=('test',))['test'].loader(8)
    score = lambda model: {k: v for k, v in validate_detection(model, test_dl).items() if k in COLUMNS}
    line = lambda r: '  '.join(f"{k} {r[k]:.3f}" for k in COLUMNS)
    result = {'imgsz': a.imgsz, 'phase1_epochs': a.epochs, 'finetune_epochs': a.finetune, 'threads': torch.get_num_threads(),
              'finetune_recipe': recipe, 'single': {}}
    t_all = time.perf_counter()

    for m, c in NIGHT_MODALITIES.items():
        t0 = time.perf_counter()
        pt = train_baseline(a.root, m, 'yolo11n.yaml', work/'single', a.imgsz, a.epochs, 8)
        t1 = time.perf_counter()
        phase1 = score(MultiModalYOLO({m: c}, pt, fusion=None))
        print(f"{m:>16} only, phase 1 ({a.epochs} epochs, {t1 - t0:5.0f}s): {line(phase1)}", flush=True)
        splits = detection_splits(a.root, a.imgsz, {m: c}, splits=('train', 'val'))
        model = MultiModalYOLO({m: c}, pt, fusion=None, imgsz=a.imgsz)
        t2 = time.perf_counter()
        fit_detector(model, splits['train'].loader(8, shuffle=True), splits['val'].loader(8), run_dir=work/'single_finetuned'/m,
                     **{**recipe, 'epochs': a.finetune})
        t3 = time.perf_counter()
        finetuned = score(model)
        print(f"{m:>16} only, + phase 2 ({a.finetune} epochs, {t3 - t2:5.0f}s): {line(finetuned)}", flush=True)
        result['single'][m] = {'phase1': phase1, 'phase1_seconds': round(t1 - t0, 1), 'finetuned': finetuned,
                               'finetune_seconds': round(t3 - t2, 1), 'weights': str(pt)}

    t0 = time.perf_counter()
    run = run_detection(a.config, {'data': {'root': a.root, 'imgsz': a.imgsz}, 'baseline': {'weights': result['single']['thermal']['weights']},
                                   'training': {'epochs': a.finetune}}, work/'fused')
    seconds = time.perf_counter() - t0
    fused = {k: float(run.table.loc['fused: all modalities'][k]) for k in COLUMNS}
    result['fused'] = {**fused, 'finetune_seconds': round(seconds, 1), 'run_dir': str(run.dir),
                       'start_on_validation': {k: run.history[0][f'valid_{k}'] for k in COLUMNS}}
    result['fused_table'] = {row: {k: float(v) for k, v in vals.items()} for row, vals in run.table.to_dict('index').items()}
    print(f"{'fused':>16}, phase 2 from thermal phase 1 ({a.finetune} epochs, {seconds:5.0f}s): {line(fused)}", flush=True)

    singles = [(f"{m} {ph}", r[ph]) for m, r in result['single'].items() for ph in ('phase1', 'finetuned')]
    best = {k: max(singles, key=lambda s: s[1][k]) for k in ('mAP50', 'mAP50-95')}  # per metric, either phase
    result['best_single'] = {k: {'model': name, 'value': r[k]} for k, (name, r) in best.items()}
    result['fused_at_least_best_single'] = {k: fused[k] >= r[k] for k, (_, r) in best.items()}
    result['metric_check'] = ultralytics_replay_check(Path(result['single']['thermal']['weights']),
                                                      yolo_dataset_view(a.root, 'thermal', work/'check_view'), a.imgsz)
    result['total_seconds'] = round(time.perf_counter() - t_all, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(run.table.round(3).to_string())
    best_txt = ', '.join(f"{k}: {v['model']} {v['value']:.3f}" for k, v in result['best_single'].items())
    print(f"best single model per metric: {best_txt}; fused >= best single: {result['fused_at_least_best_single']}; metric check identical to yolo val: "
          f"{result['metric_check']['identical']}; total {result['total_seconds']:.0f}s; wrote {out}")


if __name__ == '__main__':
    main()
