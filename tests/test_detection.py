"Tests of mmfusion.detection on the shipped night sample set (YOLO11n, tiny image sizes, CPU; 28 tests; the slowest share one short run_detection fixture)"
import json, math, shutil, socket, zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np, pytest, torch, yaml
from torch.utils.data import DataLoader, Subset

from mmfusion.data import NIGHT_MODALITIES
from mmfusion.sample_data import make_night_data
from mmfusion.config import KindError, kind_verb
from mmfusion.detection import (DetectionConfigError, detection_data_root, DetectionLoss, ExportMismatchError, GateError, MultiModalYOLO, _read_yolo_checkpoint,
                                detection_config, detection_contribution, detection_splits, detector_cams, diagnose_detection_run,
                                detection_frames, export_detector, fit_detector, load_detector, predict_detections, run_detection, train_baseline, validate_detection,
                                yolo_dataset_view)
from mmfusion.encoders import adapt_in_channels, load_yolo_model
from mmfusion.model import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]/'data'/'night'
METRICS = {'precision', 'recall', 'mAP50', 'mAP50-95'}
CONFIG = ROOT.parents[1]/'configs'/'night_person.yaml'


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
    assert list((tmp_path/'tensorboard').glob('events.out.tfevents.*'))  # the config's `tensorboard: true` default


def test_training_section_drives_the_learner_callbacks(splits):
    "`accumulate` makes one optimizer step of two batches; `early_stopping` ends the fit; a bad key or type is an error naming it"
    torch.manual_seed(0)
    model = MultiModalYOLO({'thermal': 1}, 'yolo11n.yaml', fusion=None)
    train_dl = DataLoader(Subset(splits['train'], range(8)), batch_size=4, collate_fn=splits['train'].collate)
    val_dl = DataLoader(Subset(splits['val'], range(8)), batch_size=8, collate_fn=splits['val'].collate)
    acc = fit_detector(model, train_dl, val_dl, {'epochs': 1, 'accumulate': 2, 'validate_at_start': False, 'progress': False})
    assert acc.global_step == 1
    stop = fit_detector(model, train_dl, val_dl, epochs=4, early_stopping={'patience': 1, 'min_delta': 1.0}, validate_at_start=False, progress=False)
    assert len(stop.history) == 2 and 'early stopping: valid_mAP50-95' in stop.stop_reason  # no mAP gain can exceed 1.0
    with pytest.raises(DetectionConfigError, match=r"training.lr must be a number, got '1e-4'"): fit_detector(model, train_dl, val_dl, lr='1e-4')
    with pytest.raises(DetectionConfigError, match=r"unknown config key\(s\) \['training.epoch'\]"): fit_detector(model, train_dl, val_dl, epoch=2)


def test_config_reads_through_the_library_loader_and_names_bad_keys(tmp_path):
    "`kind: detection`, `1e-4` read as a number, `--set`-style overrides; errors name the file and the key"
    cfg = detection_config(CONFIG)
    assert cfg['kind'] == 'detection' and isinstance(cfg['training']['lr'], float) and cfg['gate'] == {'map50': 0.70, 'map50_95': 0.45}
    assert detection_config(CONFIG, ['gate=null', 'training.lr=3e-4'])['gate'] is None
    assert detection_config(CONFIG, ['training.lr=3e-4'])['training']['lr'] == 3e-4
    with pytest.raises(DetectionConfigError, match=r"night_person.yaml: unknown config key\(s\) \['model.fusions'\]"): detection_config(CONFIG, ['model.fusions=x'])
    with pytest.raises(DetectionConfigError, match=r"gate.map50 must be between 0 and 1"): detection_config(CONFIG, ['gate.map50=70'])
    with pytest.raises(DetectionConfigError, match=r"data.root is missing"): detection_config(CONFIG, ['data.root=null'])
    assert detection_data_root(cfg['data']) == Path('data/night')  # `sample: night` under `root: data`, as every kind's config names sample data
    with pytest.raises(DetectionConfigError, match=r"data.sample must be one of"): detection_config(CONFIG, ['data.sample=nite'])


def test_shared_backbone_runs_every_modality_in_one_batched_pass(batch):
    "shared_backbone at inference: one forward of the backbone on all present modalities, the same output as one pass per modality"
    torch.manual_seed(0)
    model = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', shared_backbone=True).eval()
    calls = []
    hook = model.backbones['shared'].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad(): batched = model(batch)[0]
    hook.remove()
    assert calls == [3 * len(batch['ids'])]
    inputs = {m: model._input(m, x) for m, x in batch['inputs'].items()}
    with torch.no_grad():
        maps = {m: model.backbones['shared'](x).maps for m, x in inputs.items()}
        from mmfusion.detection import _run_head
        one_by_one = _run_head(model.head, model.feature_indices, [f({m: mp[k] for m, mp in maps.items()}, batch['present']).fused for k, f in enumerate(model.fusions)])[0]
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('fusion,shared', [('map_lean', False), ('map_attention', False), ('map_weighted', False), ('map_concat', False), ('map_lean', True)])
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
            assert torch.equal(t, s if s.shape == t.shape else adapt_in_channels(s, t.shape[1])), (m, k)
    for k, t in fused.head.state_dict().items():
        i, rest = k.split('.', 1)
        assert torch.equal(t, src[f'model.{int(i) + fused.cut}.{rest}']), k
    assert fused.backbones['visual_enhanced'].model[0].conv.weight.shape[1] == 3


def test_base_branch_stays_frozen(batch):
    "Frozen base branch: no gradient, weights unchanged by a step, eval mode kept; the zero-initialised fusion paths learn"
    torch.manual_seed(3)
    model = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', base='thermal')
    model.freeze(model.base_modules())
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


def test_checkpoint_round_trip_and_predict_on_paired_folders(tmp_path):
    "A saved detector rebuilds from its config; `detection_frames` pairs folders by name; JSON boxes inside each frame + drawings"
    torch.manual_seed(7)
    model = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', imgsz=64)
    save_checkpoint({'config': model.config, 'state_dict': model.state_dict()}, tmp_path/'run'/'checkpoints'/'best.pt')
    x = {m: torch.rand(1, c, 64, 64) for m, c in NIGHT_MODALITIES.items()}
    assert torch.equal(load_detector(tmp_path/'run')(x)[0], model.eval()(x)[0])
    predict_detections(tmp_path/'run', detection_frames({m: ROOT/'test'/m for m in NIGHT_MODALITIES}, NIGHT_MODALITIES), tmp_path/'pred', conf=0.0)
    recs = json.loads((tmp_path/'pred'/'predictions.json').read_text())
    assert len(recs) == len(list((ROOT/'test'/'thermal').glob('*.png'))) and all(r['missing'] == [] for r in recs)
    assert sum(len(r['detections']) for r in recs) > 0
    for r in recs:
        H, W = r['size']
        for d in r['detections']:
            x1, y1, x2, y2 = d['box_xyxy']
            assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H and d['name'] == 'person'
        assert Path(r['drawing']).is_file()
    one = predict_detections(tmp_path/'run', detection_frames({'thermal': sorted((ROOT/'test'/'thermal').glob('*.png'))[0]}, NIGHT_MODALITIES))
    assert one[0]['missing'] == ['nvg', 'visual_enhanced']
    with pytest.raises(ValueError, match='not a mix'): detection_frames({'thermal': ROOT/'test'/'thermal', 'nvg': next((ROOT/'test'/'nvg').iterdir())}, NIGHT_MODALITIES)
    with pytest.raises(KeyError, match="unknown modality 'visual'"): detection_frames({'visual': ROOT/'test'/'visual_enhanced'}, NIGHT_MODALITIES)


class Oracle(torch.nn.Module):
    "A stand-in detector that finds the labelled boxes: box j only while modality `needs[j % len(needs)]` is one it sees and present; noise otherwise"
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
            if m in self.modalities and batch['present'][i, batch['modalities'].index(m)]:
                dec[i, :4, j] = t['bboxes'][j] * torch.tensor([W, H, W, H]); dec[i, 4, j] = 0.9
        return dec, {}


def test_detection_check_flags_an_ignored_modality_and_says_when_it_cannot_compare(splits):
    "Ablation: a detector that only uses thermal is flagged (nvg adds nothing); without trained baselines the fusion verdict is a warning, never a win"
    from mmfusion.diagnosis import DETECTION_CHECKS, as_batches, diagnose
    batches = as_batches(splits['test'], batch_size=4)
    one = Oracle(['thermal', 'nvg'], needs=['thermal'])
    fs = diagnose(one, batches, DETECTION_CHECKS).findings
    assert {f.check for f in fs} == {'detection', 'finite_inputs'}  # what a detection run is diagnosed with
    assert {f.subject: f.severity for f in fs if f.check == 'detection'} == {'thermal': 'ok', 'nvg': 'problem', None: 'warning'}
    both = {f.subject: f for f in detection_contribution(Oracle(['thermal', 'nvg'], needs=['thermal', 'nvg']), batches)}
    assert {m: f.severity for m, f in both.items()} == {'thermal': 'ok', 'nvg': 'ok', None: 'warning'}  # its ablation rows are no baselines
    assert both[None].evidence['compared'] is False and 'unknown' in both[None].summary


def test_fusion_verdict_compares_with_trained_baselines_not_the_ablation(splits):
    """Negative: a fused model that needs both modalities beats its own ablation but not a trained thermal detector that finds every person -> problem.
    Positive: a fused model no better than its own thermal-alone ablation, but better than every trained baseline -> ok"""
    batches = detection_splits(ROOT, imgsz=64, splits=('test',))['test'].loader(4)
    fused = Oracle(['thermal', 'nvg'], needs=['thermal', 'nvg'])
    strong = {'thermal only (baseline)': Oracle(['thermal'], needs=['thermal']), 'nvg only (baseline)': Oracle(['nvg'], needs=['thermal', 'nvg'])}
    f = {x.subject: x for x in detection_contribution(fused, batches, strong)}[None]
    alone = max(v['mAP50-95'] for k, v in f.evidence['table'].items() if k.endswith(' alone'))
    assert f.evidence['fused'] > alone  # against the ablation it would "win"
    assert f.severity == 'problem' and f.evidence['best_single'] == 'thermal only (baseline)' and f.evidence['margin'] <= 0
    lazy = Oracle(['thermal', 'nvg'], needs=['thermal'])  # its "thermal alone" ablation row equals it: against the ablation it would "lose"
    weak = {'thermal only (baseline)': Oracle(['thermal'], needs=['thermal', 'nvg']), 'nvg only (baseline)': Oracle(['nvg'], needs=['thermal', 'nvg'])}
    g = {x.subject: x for x in detection_contribution(lazy, batches, weak)}
    assert g['nvg'].severity == 'problem'  # the ablation still says nvg is unused
    assert g[None].evidence['table']['fused model, thermal alone']['mAP50-95'] == g[None].evidence['fused']
    assert g[None].severity == 'ok' and g[None].evidence['margin'] > 0 and g[None].evidence['missing_baselines'] == []
    assert g[None].evidence['baselines'] == {'thermal only (baseline)': 'thermal', 'nvg only (baseline)': 'nvg'}
    assert 'start' not in g[None].evidence  # stand-ins have no base modality to have started from
    h = {x.subject: x for x in detection_contribution(lazy, batches, {'thermal only (baseline)': weak['thermal only (baseline)']})}[None]
    assert h.severity == 'warning' and h.evidence['missing_baselines'] == ['nvg']  # a win over some baselines is not a win over all


class NoiseUser(Oracle):
    "Finds every box through `thermal` alone; `noise` only re-draws a small jitter of those boxes (present and absent draws are alike): pure noise"
    def __init__(self, seed): super().__init__(['thermal', 'noise'], needs=['thermal']); self.seed = seed
    def forward(self, batch):
        dec, raw = super().forward(batch)
        t = batch['target']
        for j in range(len(t['batch_idx'])):
            i = int(t['batch_idx'][j])
            key, on = [self.seed, zlib.crc32(batch['ids'][i].encode()), j], bool(batch['present'][i, batch['modalities'].index('noise')])
            dec[i, :4, j] += 1.5 * torch.as_tensor(np.random.default_rng(key + [on]).uniform(-1, 1, 4), dtype=dec.dtype)
            if dec[i, 4, j] == 0.9: dec[i, 4, j] = 0.5 + 0.4 * np.random.default_rng(key).random()  # distinct confidences: no ties in the ranking
        return dec, raw


def test_ablation_verdict_needs_an_interval_that_excludes_zero(splits):
    """Planted truth: thermal carries every box, `noise` is pure noise. For these seeds the noise's point drop is > 0 (the old
    'removing it costs > 0' rule called it a contributor); its paired bootstrap interval includes 0, so it is not. Thermal's excludes 0"""
    batches = [dict(b, modalities=['thermal', 'noise'], inputs={'thermal': b['inputs']['thermal'], 'noise': b['inputs']['nvg']}, present=b['present'][:, :2])
               for b in detection_splits(ROOT, imgsz=64, splits=('test',))['test'].loader(4)]
    for seed in (6, 8):
        f = {x.subject: x for x in detection_contribution(NoiseUser(seed), batches)}
        assert f['noise'].evidence['contribution'] > 0  # the point value alone would say "contributes"
        lo, hi = f['noise'].evidence['contribution_ci']
        assert lo < 0 < hi and f['noise'].evidence['verdict'] == 'inconclusive' and f['noise'].severity == 'warning', f['noise'].summary
        assert f['thermal'].evidence['verdict'] == 'contributes' and f['thermal'].evidence['contribution_ci'][0] > 0 and f['thermal'].severity == 'ok'


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "A run_detection run on a tiny generated night set: three trained baselines (1 + 1 epochs at 64 px) and the fused model"
    tmp = tmp_path_factory.mktemp('night_run')
    root = make_night_data(tmp/'night', n_frames=20, seed=3)
    return run_detection(CONFIG, {'data': {'root': str(root), 'sample': None, 'imgsz': 64}, 'baseline': {'epochs': 1}, 'training': {'epochs': 1}, 'gate': None}, tmp/'run')


def test_run_records_every_trained_baseline_and_the_diagnosis_loads_them(tiny_run):
    "The run folder records a checkpoint and test metrics per baseline; the diagnosis compares the fused model with exactly those detectors"
    metrics = json.loads((tiny_run.dir/'metrics.json').read_text())
    assert sorted(metrics['baselines']) == sorted(NIGHT_MODALITIES)
    for m, r in metrics['baselines'].items():
        assert Path(r['phase1']).is_file() and Path(r['finetuned']).is_file() and set(r['test']) == METRICS
        assert load_detector(r['finetuned']).modalities == [m]
        assert metrics['table'][f'{m} only (baseline)'] == r['test']
    assert metrics['baseline'] == metrics['baselines']['thermal']['phase1']  # the fused model's initialisation
    assert {'thermal phase1', 'nvg finetune', 'fused finetune', 'training'} <= set(metrics['seconds'])
    assert metrics['gate']['gate'] is None and metrics['gate']['passed'] is None and set(metrics['gate']['measured']) == {'map50', 'map50_95'}
    diag = diagnose_detection_run(tiny_run.dir, 'test', out=tiny_run.dir/'diag_test')
    versus = next(f for f in diag.findings if f.check == 'detection' and f.subject is None)
    assert versus.evidence['baselines'] == {f'{m} only (baseline)': m for m in NIGHT_MODALITIES}
    for m in NIGHT_MODALITIES:  # the diagnosis scores the recorded detectors: the same numbers as the run's own evaluation
        assert versus.evidence['table'][f'{m} only (baseline)']['mAP50-95'] == pytest.approx(metrics['baselines'][m]['test']['mAP50-95'])
    assert (tiny_run.dir/'diag_test'/'detection_eigencam.png').is_file()


def test_old_config_without_baseline_modalities(tiny_run):
    "A config from before `baseline.modalities` still resolves (the base alone); a run folder without recorded baselines falls back to its Phase 1"
    import yaml
    cfg = yaml.safe_load((tiny_run.dir/'config.yaml').read_text())
    cfg['baseline'].pop('modalities'); cfg['baseline'].pop('finetune')
    assert detection_config(cfg)['baseline']['modalities'] == ['thermal'] and detection_config(cfg)['baseline']['finetune'] is True
    with pytest.raises(ValueError, match="'radar' is not one of data.modalities"): detection_config(cfg, {'baseline': {'modalities': ['radar']}})
    old = tiny_run.dir.parent/'old_run'
    old.mkdir()
    for name in ('checkpoints', 'baseline'):
        (old/name).symlink_to(tiny_run.dir/name)
    (old/'config.yaml').write_text(yaml.safe_dump(cfg))  # no metrics.json: as if written before the trained baselines
    versus = next(f for f in diagnose_detection_run(old, 'test').findings if f.check == 'detection' and f.subject is None)
    assert versus.evidence['baselines'] == {'thermal only (baseline)': 'thermal'}
    assert versus.severity in ('warning', 'problem') and versus.evidence['missing_baselines'] == ['nvg', 'visual_enhanced']


def test_eigencam_of_a_backbone_sees_only_its_own_modality(batch):
    "EigenCAM per backbone: changing the nvg frame leaves the thermal and visual panels unchanged and changes the nvg panel"
    torch.manual_seed(8)
    model = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', base='thermal')
    frame = {m: x[0] for m, x in batch['inputs'].items()}
    a = detector_cams(model, frame)
    b = detector_cams(model, {**frame, 'nvg': torch.rand_like(frame['nvg'])})
    assert set(a) == {*NIGHT_MODALITIES, 'fused'} and all(v.shape == frame['thermal'].shape[-2:] for v in a.values())
    assert (a['thermal'] == b['thermal']).all() and (a['visual_enhanced'] == b['visual_enhanced']).all()
    assert not (a['nvg'] == b['nvg']).all()
    with pytest.raises(KeyError, match="no 'nvg' image"): detector_cams(model, {'thermal': frame['thermal']})


def _data_root(run) -> str: return str(detection_data_root(detection_config(run.path/'config.yaml')['data']))


def test_gate_refuses_a_weak_baseline_and_force_overrides_it(tiny_run, tmp_path):
    "The night plan's gate refuses the one-epoch thermal Phase 1 before anything else trains, naming the values and the overrides; force starts anyway"
    pt = tiny_run.baselines['thermal']['phase1']
    small = {'data': {'root': _data_root(tiny_run), 'sample': None, 'imgsz': 64}, 'baseline': {'weights': {'thermal': pt}, 'modalities': ['thermal']},
             'training': {'epochs': 1}}
    with pytest.raises(GateError, match=r"thermal Phase-1 detector \(.*best.pt; `baseline.weights` can reuse it\) on the val split .* mAP50 0\.\d{3} \(not above the gate's 0\.7\).*--set gate=null"):
        run_detection(CONFIG, small, tmp_path/'refused')
    assert sorted(p.name for p in (tmp_path/'refused').iterdir()) == ['config.yaml']  # refused before any training
    forced = run_detection(CONFIG, small, tmp_path/'forced', force=True, verbose=False)
    gate = json.loads((forced.path/'metrics.json').read_text())['gate']
    assert gate['gate'] == {'map50': 0.70, 'map50_95': 0.45} and gate['passed'] is False and gate['forced'] is True
    assert gate['measured']['map50'] == pytest.approx(tiny_run.baselines['thermal']['gate']['measured']['map50'])  # same Phase 1, same val split


def test_detection_verbs_on_a_short_run(tiny_run, tmp_path):
    "Every verb a detection run registers: train is run_detection (no resume), evaluate, diagnose, predict and export from the run folder alone"
    assert kind_verb('detection', 'train') is run_detection
    with pytest.raises(KindError, match='cannot resume'): run_detection(CONFIG, resume=tiny_run.path)
    ev = kind_verb('detection', 'evaluate')(tiny_run.path, 'test', tmp_path/'eval')
    ran = json.loads((tiny_run.path/'metrics.json').read_text())['table']
    for row, r in ran.items(): assert ev['table'][row] == pytest.approx(r), row  # the folder alone reproduces the run's own test table
    assert json.loads((tmp_path/'eval'/'metrics.json').read_text())['metrics'] == pytest.approx(ran['fused: all modalities'])
    diag = kind_verb('detection', 'diagnose')(tiny_run.path, out=tmp_path/'diag', checks=['detection'], max_samples=8)
    assert diag.findings and (tmp_path/'diag'/'findings.json').is_file() and 'val split' in diag.title
    test_dir = Path(_data_root(tiny_run))/'test'
    recs = kind_verb('detection', 'predict')(tiny_run.path, test_dir, conf=0.01)
    assert (tiny_run.path/'predictions'/'predictions.json').is_file()  # where every kind's predict writes by default
    assert len(recs) == len(list((test_dir/'thermal').iterdir())) == len(json.loads((tiny_run.path/'predictions'/'predictions.json').read_text()))
    res = kind_verb('detection', 'export')(tiny_run.path, tmp_path/'export', data_root='ignored')
    card = json.loads((tmp_path/'export'/'detector.json').read_text())
    assert sorted(res) == ['onnx', 'torchscript'] and all(Path(r['path']).is_file() for r in res.values())
    assert all(r['max_abs_diff']['raw'] <= 1e-4 for r in res.values()) and card['inputs'][-1]['name'] == 'present'
    assert ev['headline'] == {'name': 'mAP50-95', 'value': ran['fused: all modalities']['mAP50-95']}


def test_export_needs_only_the_run_folder_and_predict_reads_a_manifest(tiny_run, tmp_path):
    "The export size comes from metrics.json (a run copied without its data exports); `predict --manifest` reads frames from a CSV; drawings land whole"
    moved = tmp_path/'moved'
    shutil.copytree(tiny_run.path, moved, ignore=shutil.ignore_patterns('baseline', 'baselines', 'tensorboard', 'export', 'predictions'))
    cfg = yaml.safe_load((moved/'config.yaml').read_text())
    cfg['data'] = {**cfg['data'], 'root': str(tmp_path/'gone'), 'sample': None}
    (moved/'config.yaml').write_text(yaml.safe_dump(cfg))
    size = tuple(json.loads((moved/'metrics.json').read_text())['frame_size'])
    res = kind_verb('detection', 'export')(moved, tmp_path/'export', ['onnx'])
    assert res['onnx']['max_abs_diff']['raw'] <= 1e-4
    assert json.loads((tmp_path/'export'/'detector.json').read_text())['inputs'][0]['shape'][2:] == list(size)
    test_dir = Path(_data_root(tiny_run))/'test'
    stems = sorted(p.stem for p in (test_dir/'thermal').iterdir())[:3]
    manifest = tmp_path/'frames.csv'
    manifest.write_text('id,thermal,nvg\n' + ''.join(f"{s},{test_dir/'thermal'/(s + '.png')},{test_dir/'nvg'/(s + '.png') if i else ''}\n" for i, s in enumerate(stems)))
    recs = kind_verb('detection', 'predict')(moved, str(manifest), tmp_path/'pred', conf=0.01)
    assert [r['missing'] for r in recs] == [['nvg', 'visual_enhanced'], ['visual_enhanced'], ['visual_enhanced']]
    assert all(Path(r['drawing']).is_file() for r in recs) and not list((tmp_path/'pred').glob('.*.tmp'))  # no half-written files left
    bad = tmp_path/'bad.csv'
    bad.write_text('name,thermal\nf,a.png\n')
    with pytest.raises(ValueError, match=r"bad.csv: a manifest needs an 'id' column"): kind_verb('detection', 'predict')(moved, str(bad))


def test_export_parity_is_checked_and_can_fail(tmp_path):
    "ONNX (run by onnxruntime on another batch size, some samples missing a modality) matches PyTorch's raw outputs; a zero tolerance is refused"
    torch.manual_seed(9)
    model = MultiModalYOLO({'thermal': 1, 'nvg': 1}, 'yolo11n.yaml', base='thermal')
    with torch.no_grad():
        for p in model.fusions.parameters(): p.add_(torch.randn_like(p) * 0.05)  # fusion paths that are not zero
    export_detector(model, tmp_path/'ok', (64, 96), ('onnx',))
    diff = json.loads((tmp_path/'ok'/'detector.json').read_text())['max_abs_diff']['onnx']
    assert 0 < diff['raw'] <= 1e-4  # a real difference, within the tolerance
    with pytest.raises(ExportMismatchError, match='do not deploy it'): export_detector(model, tmp_path/'strict', (64, 96), ('onnx',), atol=0.0)
    with pytest.raises(ValueError, match="format must be one of"): export_detector(model, tmp_path/'x', (64, 96), ('tflite',))
