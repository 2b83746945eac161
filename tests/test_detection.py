"Tests of mmfusion.detection on the shipped night sample set (YOLO11n, tiny image sizes, CPU; well under a minute)"
import json, math, socket
from pathlib import Path
from types import SimpleNamespace

import pytest, torch
from torch.utils.data import DataLoader, Subset

from mmfusion.data import NIGHT_MODALITIES
from mmfusion.detection import (DetectionLoss, MultiModalYOLO, _read_yolo_checkpoint, detection_splits, fit_detector,
                                load_detector, predict_cli, train_baseline, validate_detection, yolo_dataset_view)
from mmfusion.encoders import _adapt_in_channels, load_yolo_model
from mmfusion.model import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]/'data'/'night'
METRICS = {'precision', 'recall', 'mAP50', 'mAP50-95'}


@pytest.fixture(scope='module')
def splits(): return detection_splits(ROOT, imgsz=64)


@pytest.fixture(scope='module')
def batch(splits): return next(iter(splits['train'].loader(4, shuffle=True)))


def test_smoke_two_steps_and_one_validation(splits, tmp_path):
    "CI smoke test: a 3-modality fused YOLO11n, two training steps with the Learner and one validation pass"
    torch.manual_seed(0)
    model = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', base='thermal')
    train_dl = DataLoader(Subset(splits['train'], range(8)), batch_size=4, shuffle=True, collate_fn=splits['train'].collate)
    learn = fit_detector(model, train_dl, splits['val'].loader(8), epochs=1, lr=1e-3, lr_mult={'fusions': 10},
                         validate_at_start=False, run_dir=tmp_path, progress=False)
    assert learn.global_step == 2 and len(learn.history) == 1
    row = learn.history[0]
    assert math.isfinite(row['train_loss']) and math.isfinite(row['valid_loss'])
    assert {f'valid_{k}' for k in METRICS} <= set(row)
    assert all(0 <= row[f'valid_{k}'] <= 1 for k in METRICS)
    assert (tmp_path/'checkpoints'/'best.pt').is_file() and (tmp_path/'history.csv').is_file()


@pytest.mark.parametrize('fusion,shared', [('map_attention', False), ('map_weighted', False), ('map_concat', False), ('map_attention', True)])
def test_step0_equals_the_single_modality_model(batch, fusion, shared):
    "Baseline first: initialised from a thermal YOLO, the fused model's predictions and loss at step 0 are exactly the thermal model's"
    torch.manual_seed(1)
    thermal = load_yolo_model('yolo11n.yaml', in_channels=1, nc=1).eval()
    fused = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', fusion=fusion, base='thermal', shared_backbone=shared)
    fused.load_single(thermal)
    x = {m: torch.rand_like(v) * 3 for m, v in batch['inputs'].items()}
    x['thermal'] = batch['inputs']['thermal']
    assert torch.equal(fused.eval()(x)[0], thermal(x['thermal'])[0])
    fused.train(); thermal.train()
    thermal.args = fused.args
    from ultralytics.utils.loss import v8DetectionLoss
    ref, _ = v8DetectionLoss(thermal)(thermal(batch['inputs']['thermal']), batch['target'])
    assert torch.equal(DetectionLoss(fused)(fused(batch), batch), ref.sum())


def test_loaded_weights_equal_the_source(tmp_path):
    "A single-modality .pt loads into every backbone (first conv adapted to 3 channels for visual) and into the neck + head unchanged"
    torch.manual_seed(2)
    torch.save({'model': load_yolo_model('yolo11n.yaml', in_channels=1, nc=1)}, tmp_path/'thermal.pt')
    src = _read_yolo_checkpoint(tmp_path/'thermal.pt').state_dict()
    fused = MultiModalYOLO(NIGHT_MODALITIES, tmp_path/'thermal.pt', base='thermal')
    for m in fused.modalities:
        for k, t in fused.backbones[m].model.state_dict().items():
            s = src[f'model.{k}']
            assert torch.equal(t, s if s.shape == t.shape else _adapt_in_channels(s, t.shape[1])), (m, k)
    for k, t in fused.head.state_dict().items():
        i, rest = k.split('.', 1)
        assert torch.equal(t, src[f'model.{int(i) + fused.cut}.{rest}']), k
    assert fused.backbones['visual_enhanced'].model[0].conv.weight.shape[1] == 3


def test_base_branch_stays_frozen(batch):
    "Frozen base branch: no gradient, weights unchanged by a step, eval mode kept; the zero-initialised fusion paths learn"
    torch.manual_seed(3)
    model = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', base='thermal')
    model.freeze(model.base_modules)
    model.train()
    assert not model.head.training and not model.backbones['thermal'].training and model.backbones['nvg'].training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = DetectionLoss(model)(model(batch), batch)
    loss.backward(); opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith(('head.', 'backbones.thermal.')))
    assert not torch.equal(after['fusions.0.residual.weight'], before['fusions.0.residual.weight'])


def test_absent_modality_gives_finite_boxes_and_no_gradient(batch):
    "A modality absent from the whole batch is not run (no gradient reaches its backbone); boxes stay finite"
    torch.manual_seed(4)
    model = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', fusion='map_attention')
    present = batch['present'].clone()
    present[:, 1] = False
    out = model({**batch, 'present': present})
    DetectionLoss(model)(out, batch).backward()
    assert all(p.grad is None for p in model.backbones['nvg'].parameters())
    assert all(p.grad is not None for p in model.backbones['visual_enhanced'].parameters() if p.requires_grad)
    present[0] = torch.tensor([False, False, True])
    assert torch.isfinite(model.eval()({**batch, 'present': present})[0]).all()


@pytest.mark.parametrize('modalities', [{'thermal': 1}, {'a': 1, 'b': 3}, {'a': 1, 'b': 3, 'c': 1, 'd': 2}])
def test_any_number_of_modalities(modalities):
    torch.manual_seed(5)
    model = MultiModalYOLO(modalities, 'yolo11n.yaml', fusion='map_weighted').eval()
    y, _ = model({m: torch.rand(2, c, 64, 96) for m, c in modalities.items()})
    assert y.shape == (2, 5, 8 * 12 + 4 * 6 + 2 * 3) and torch.isfinite(y).all()


class Replay(torch.nn.Module):
    "A stand-in detector that returns given outputs, one per batch"
    def __init__(self, outputs): super().__init__(); self.w, self.names, self.outputs = torch.nn.Parameter(torch.zeros(1)), {0: 'person'}, iter(outputs)
    def forward(self, batch): return next(self.outputs)


def test_metrics_identical_to_ultralytics_validator(tmp_path):
    "Same predictions and labels: `validate_detection` gives exactly what ultralytics' DetectionValidator computes"
    from ultralytics.models.yolo.detect import DetectionValidator
    g = torch.Generator().manual_seed(6)
    H, W, A = 64, 96, 200
    batches, raws = [], []
    for b in range(3):
        n = torch.randint(1, 4, (4,), generator=g)
        idx = torch.cat([torch.full((int(k),), float(i)) for i, k in enumerate(n)])
        boxes = torch.cat([torch.rand(len(idx), 2, generator=g) * 0.6 + 0.2, torch.rand(len(idx), 2, generator=g) * 0.2 + 0.05], 1)
        dec = torch.cat([torch.rand(4, 2, A, generator=g) * torch.tensor([W, H]).view(1, 2, 1), torch.rand(4, 2, A, generator=g) * 20 + 2,
                         torch.rand(4, 1, A, generator=g) * 0.3], 1)  # decoded xywh pixels + a score: mostly noise
        for j in range(len(idx)):  # a jittered, confident copy of each labelled box
            i = int(idx[j]); a = j
            dec[i, :4, a] = boxes[j] * torch.tensor([W, H, W, H]) + torch.randn(4, generator=g)
            dec[i, 4, a] = 0.5 + 0.5 * torch.rand(1, generator=g)
        raws.append((dec, {}))
        batches.append({'inputs': {'thermal': torch.zeros(4, 1, H, W)}, 'present': torch.ones(4, 1, dtype=torch.bool), 'modalities': ['thermal'],
                        'target': {'batch_idx': idx, 'cls': torch.zeros(len(idx), 1), 'bboxes': boxes}, 'ids': [f'{b}_{i}' for i in range(4)]})
    ours = validate_detection(Replay(raws), batches)
    v = DetectionValidator(save_dir=tmp_path, args={'plots': False, 'conf': 0.001, 'iou': 0.7})
    v.data, v.training, v.device = {}, True, torch.device('cpu')
    v.init_metrics(SimpleNamespace(names={0: 'person'}, end2end=False))
    for (dec, _), bt in zip(raws, batches):
        ub = {**bt['target'], 'img': torch.zeros(4, 1, H, W), 'ori_shape': [(H, W)] * 4, 'ratio_pad': [((1., 1.), (0., 0.))] * 4,
              'im_file': [f'{i}.png' for i in bt['ids']]}
        v.update_metrics(v.postprocess(dec), ub)
    theirs = v.get_stats()
    assert ours['mAP50'] > 0.1
    for k in METRICS: assert ours[k] == theirs[f'metrics/{k}(B)'], k


def test_baseline_trains_offline_and_loads(tmp_path, batch):
    "Phase 1 with ultralytics' trainer makes no network attempt; its weights start the fused model exactly"
    view = yolo_dataset_view(ROOT, 'nvg', tmp_path/'view')
    assert (view.parent/'train'/'images'/'frame_0001.png').resolve() == (ROOT/'train'/'nvg'/'frame_0001.png').resolve()
    attempts, real = [], (socket.socket.connect, socket.getaddrinfo)
    def refuse(*a, **k): attempts.append(a[:2]); raise OSError('no network in tests')
    socket.socket.connect, socket.getaddrinfo = (lambda self, *a, **k: refuse(*a)), refuse
    try: pt = train_baseline(ROOT, 'thermal', 'yolo11n.yaml', tmp_path/'baseline', imgsz=64, epochs=1, batch=8)
    finally: socket.socket.connect, socket.getaddrinfo = real
    assert attempts == [] and pt.is_file()
    fused = MultiModalYOLO(NIGHT_MODALITIES, pt, base='thermal').eval()
    assert torch.equal(fused(batch)[0], _read_yolo_checkpoint(pt).eval()(batch['inputs']['thermal'])[0])
    with pytest.raises(FileNotFoundError, match='never downloads'): train_baseline(ROOT, model='yolo11n.pt', run_dir=tmp_path/'x')


def test_checkpoint_round_trip_and_predict_cli(tmp_path):
    "A saved detector rebuilds from its config; `predict_cli` pairs folders by name and writes JSON boxes inside each frame + drawings"
    torch.manual_seed(7)
    model = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', imgsz=64)
    save_checkpoint({'config': model.config, 'state_dict': model.state_dict()}, tmp_path/'run'/'checkpoints'/'best.pt')
    x = {m: torch.rand(1, c, 64, 64) for m, c in NIGHT_MODALITIES.items()}
    assert torch.equal(load_detector(tmp_path/'run')(x)[0], model.eval()(x)[0])
    out = predict_cli(tmp_path/'run', {m: ROOT/'test'/m for m in NIGHT_MODALITIES}, tmp_path/'pred', conf=0.0)
    recs = json.loads(out.read_text())
    assert len(recs) == 9 and all(r['missing'] == [] for r in recs)
    assert sum(len(r['detections']) for r in recs) > 0
    for r in recs:
        H, W = r['size']
        for d in r['detections']:
            x1, y1, x2, y2 = d['box_xyxy']
            assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H and d['name'] == 'person'
        assert Path(r['drawing']).is_file()
    one = predict_cli(tmp_path/'run', {'thermal': ROOT/'test'/'thermal'/'frame_0052.png'}, tmp_path/'one')
    assert json.loads(one.read_text())[0]['missing'] == ['nvg', 'visual_enhanced']


class Oracle(torch.nn.Module):
    "A stand-in detector that finds the labelled boxes: box j only while modality `needs[j % len(needs)]` is present; noise otherwise"
    def __init__(self, modalities, needs):
        super().__init__()
        self.w, self.names, self.modalities, self.needs = torch.nn.Parameter(torch.zeros(1)), {0: 'person'}, list(modalities), list(needs)
    def forward(self, batch):
        H, W = next(iter(batch['inputs'].values())).shape[-2:]
        B, t, A = len(batch['ids']), batch['target'], 50
        g = torch.Generator().manual_seed(0)
        dec = torch.cat([torch.rand(B, 2, A, generator=g) * torch.tensor([W, H]).view(1, 2, 1), torch.rand(B, 2, A, generator=g) * 8 + 2,
                         torch.rand(B, 1, A, generator=g) * 0.2], 1)
        for j in range(len(t['batch_idx'])):
            i, m = int(t['batch_idx'][j]), self.needs[j % len(self.needs)]
            if batch['present'][i, batch['modalities'].index(m)]:
                dec[i, :4, j] = t['bboxes'][j] * torch.tensor([W, H, W, H]); dec[i, 4, j] = 0.9
        return dec, {}


def test_detection_check_flags_an_ignored_modality_and_a_useless_fusion(splits):
    "Positive control: a detector that only uses thermal is flagged twice (nvg adds nothing; fused = thermal alone); one needing both is not"
    from mmfusion.detection import detection_contribution
    from mmfusion.diagnosis import as_batches, diagnose
    batches = as_batches(splits['test'], batch_size=4)
    one = Oracle(['thermal', 'nvg'], needs=['thermal'])
    fs = diagnose(one, batches).findings
    assert {f.check for f in fs} == {'detection', 'finite_inputs'}  # detection batches get DETECTION_CHECKS
    verdict = {f.subject: f.severity for f in fs if f.check == 'detection'}
    assert verdict == {'thermal': 'ok', 'nvg': 'problem', None: 'problem'}
    both = {f.subject: f for f in detection_contribution(Oracle(['thermal', 'nvg'], needs=['thermal', 'nvg']), batches)}
    assert {m: f.severity for m, f in both.items()} == {'thermal': 'ok', 'nvg': 'ok', None: 'ok'}
    assert both[None].evidence['margin'] > 0 and both[None].evidence['best_single'] in ('fused model, thermal alone', 'fused model, nvg alone')

