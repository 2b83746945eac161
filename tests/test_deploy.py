"""Deployment on trained sample runs: the Predictor reads raw files as training did, exports match PyTorch, TTA/ensembles/distillation keep their invariants."""
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np, pandas as pd, pytest, torch, torch.nn as nn, torch.nn.functional as F, yaml

from mmfusion.data import DataError
from mmfusion.deploy import (EXPORT_FORMATS, TTA_VIEWS, Distill, Ensemble, ExportedModel, Predictor, TTAPredictor, check_export, distill,
                             distillation_loss, export_model, flat_inputs, predictor_outputs)
from mmfusion.config import build_splits, load_config
from mmfusion.runs import train

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT/'data'
QUICK = [f'data.root={DATA}', 'training.epochs=2', 'training.progress=false', 'training.tensorboard=false']
WELD_SAMPLE = DATA/'weld'/'samples'/'overlap_006'  # a TEST sample of the weld manifest


def weld_files(folder=WELD_SAMPLE) -> dict:
    return {'video': str(folder/'video.mp4'), 'images': [str(p) for p in sorted((folder/'images').glob('angle_*.png'))],
            'audio': str(folder/'audio.wav'), 'sensors': str(folder/'sensors.csv')}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('runs')
    return {c: train(ROOT/f'configs/{c}.yaml', QUICK + [f'runs_dir={d}'], verbose=False).dir for c in ('weld', 'inspection')}


@pytest.fixture(scope='module')
def predictors(runs): return {c: Predictor.from_run(d) for c, d in runs.items()}


@pytest.mark.parametrize('name', ['weld', 'inspection'])
def test_predictor_matches_the_training_pipeline(runs, predictors, name):
    "Raw files through the Predictor give the same outputs as the training datasets' batch through the model"
    p = predictors[name]
    cfg = load_config(runs[name]/'config.yaml')
    ds = build_splits({**cfg['data'], 'cache': False})['test']
    rec = ds.records[0]
    batch = ds.collate([ds[0]])
    ref = p.outputs(batch)
    if name == 'weld': inputs = {m: (list(map(str, v)) if isinstance(v, list) else str(v)) for m, v in rec.sources.items() if v is not None}
    else: inputs = {'image': str(rec.sources['image']), 'metadata': ds[0].inputs['metadata'].tolist()}
    got = p.outputs(p.collate([p.prepare(inputs, rec.id)]))
    for k in ref: assert torch.allclose(ref[k], got[k], atol=1e-5), (k, (ref[k] - got[k]).abs().max())
    pred = p.predict(inputs, ids=[rec.id])
    assert pred.id == rec.id and pred.missing == []
    if name == 'weld': assert len(pred.embedding) == 32 and abs(np.linalg.norm(pred.embedding) - 1) < 1e-4
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5 and pred.label == p.class_names[pred.class_index]


def test_missing_modalities_are_masked(predictors):
    p = predictors['weld']
    files = weld_files()
    full, partial = p.predict([files, {'sensors': files['sensors'], 'audio': files['audio']}])
    assert full.missing == [] and partial.missing == ['video', 'images']
    batch = p.collate([p.prepare({'sensors': files['sensors']})])
    assert batch['present'].tolist() == [[False, False, False, True]]
    assert np.isfinite(partial.embedding).all() and full.embedding != partial.embedding


def test_bad_inputs_name_the_problem(predictors, tmp_path):
    p = predictors['weld']
    bad = tmp_path/'video.mp4'; bad.write_bytes(b'\x00' * 100)
    cases = [({'thermal': 'x.png'}, "modality 'thermal': unknown modality"),
             ({'video': str(bad)}, "modality 'video'"),
             ({'sensors': np.zeros((10, 6)).tolist()}, "has shape (10, 6), expected (64, 6)"),
             ({'sensors': [[1, 2], [3]]}, "not a rectangular array"),
             ({}, 'no modality given')]
    for inputs, msg in cases:
        with pytest.raises(DataError, match=None) as e: p.predict(inputs)
        assert msg in str(e.value), (inputs, str(e.value))



def test_a_batch_is_prepared_and_answered_as_each_sample_alone(predictors):
    "prepare_batch encodes a batch's metadata rows as one table: every sample equals `prepare` alone, every answer `predict` alone, in the batch's order"
    p = predictors['inspection']
    cells = [l.split('\t')[0].split('/')[-1].rsplit('.', 1)[0] for l in (DATA/'inspection'/'test.txt').read_text().splitlines()][:8]
    rows = pd.read_csv(DATA/'inspection'/'metadata.csv', dtype=str).set_index('sample_id')
    inputs = [{'image': str(DATA/'inspection'/'images'/f'{c}.png'), 'metadata': rows.loc[c].to_dict()} for c in cells]
    inputs[1]['metadata'] = {k: (float(v) if k in ('capacity_mah', 'voltage', 'weight_g') else v) for k, v in inputs[1]['metadata'].items()}  # numbers, not text
    inputs[2]['metadata'] = {**inputs[2]['metadata'], 'supplier': 'never seen'}  # an unknown category: code 0
    inputs[3] = {'image': inputs[3]['image']}  # metadata absent
    inputs[4]['metadata'] = p.specs['metadata'].decode(inputs[4]['metadata']).tolist()  # an encoded row, as an array
    alone = [p.prepare(x, c) for x, c in zip(inputs, cells)]
    together = p.prepare_batch(inputs, cells)
    assert [s.id for s in together] == cells
    for a, t in zip(alone, together):
        assert a.inputs.keys() == t.inputs.keys() and all(torch.equal(a.inputs[m], t.inputs[m]) for m in a.inputs), a.id
    assert together[2].inputs['metadata'][3] == 0 and 'metadata' not in together[3].inputs
    # the rows differ, so a row given to another sample would be caught above; so do the answers, below
    meta = [s.inputs['metadata'] for s in together if 'metadata' in s.inputs]
    assert all(not torch.equal(a, b) for i, a in enumerate(meta) for b in meta[i + 1:])
    batch, single = p.predict(inputs, cells), [p.predict(x, [c]) for x, c in zip(inputs, cells)]
    assert len({tuple(s.probabilities.values()) for s in single}) == len(single)
    for b, s in zip(batch, single):
        assert (b.id, b.label, b.missing) == (s.id, s.label, s.missing)
        assert np.allclose(list(b.probabilities.values()), list(s.probabilities.values()), atol=1e-6), b.id
    with pytest.raises(DataError) as e: p.prepare_batch([inputs[0], {'metadata': {'voltage': 3.6}}], ['good', 'bad'])
    assert "(sample 'bad'): row lacks column(s) ['capacity_mah'" in str(e.value), str(e.value)
    with pytest.raises(DataError) as e: p.prepare_batch([inputs[0], inputs[1], {'metadata': {**inputs[0]['metadata'], 'voltage': 'oops'}}], ['good', 'fine', 'bad'])
    assert "(sample 'bad')" in str(e.value) and "column 'voltage' holds 'oops'" in str(e.value), str(e.value)

def test_preprocessing_json_replaces_the_training_data(runs, predictors, tmp_path):
    p = predictors['inspection']
    p.write_preprocessing(runs['inspection'])
    try:
        alone = Predictor.from_run(runs['inspection'], data_root=tmp_path/'no-data-here')
        assert alone.specs == p.specs and alone.class_names == p.class_names
        img = str(DATA/'inspection'/'images'/'cell_0003.png')
        assert alone.predict({'image': img}).to_dict() == p.predict({'image': img}).to_dict()
    finally: (runs['inspection']/'preprocessing.json').unlink()


@pytest.mark.parametrize('name', ['weld', 'inspection'])
@pytest.mark.parametrize('fmt', list(EXPORT_FORMATS))
def test_export_matches_pytorch(runs, predictors, tmp_path, name, fmt):
    p = predictors[name]
    path = export_model(p, tmp_path/f'{name}{EXPORT_FORMATS[fmt]}', fmt)
    cfg = load_config(runs[name]/'config.yaml')
    ds = build_splits({**cfg['data'], 'cache': False})['test']
    batch = ds.collate([ds[i] for i in range(4)])
    batch['present'][1::2, 0] = False  # first modality masked in every other sample
    on_data, on_random = check_export(path, p, flat_inputs(batch, p.modalities)), check_export(path, p)
    print(f"{name} {fmt} (batch axis: {ExportedModel(path).batch_size or 'dynamic'}): max abs diff vs PyTorch, test batch {on_data}, random batch (n=M+3) {on_random}")
    assert set(on_data) == set(p.kinds) and max(on_data.values()) < 1e-4 and max(on_random.values()) < 1e-4
    assert ExportedModel(path).batch_size is None, 'the batch axis was frozen into the graph (an encoder or fusion builds a tensor from a Python size)'


def test_tta_and_ensemble_invariants(runs, predictors):
    p = predictors['inspection']
    cfg = load_config(runs['inspection']/'config.yaml')
    ds = build_splits({**cfg['data'], 'cache': False})['test']
    plain, _ = predictor_outputs(p, ds)
    same, _ = predictor_outputs(TTAPredictor(p, ['identity']), ds)
    assert torch.allclose(same['logits'], plain['logits'].log_softmax(-1), atol=1e-5)
    twice, _ = predictor_outputs(Ensemble([p, p]), ds)
    assert torch.allclose(twice['logits'], plain['logits'].log_softmax(-1), atol=1e-5)
    tta, _ = predictor_outputs(TTAPredictor(p, ['identity', 'hflip', 'rot90']), ds)
    assert torch.allclose(tta['logits'].exp().sum(-1), torch.ones(len(ds)), atol=1e-5)
    w, _ = predictor_outputs(Ensemble([predictors['weld'], predictors['weld']]), build_splits({**load_config(runs['weld']/'config.yaml')['data'], 'cache': False})['test'])
    assert torch.allclose(w['embedding'].norm(dim=-1), torch.ones(len(w['embedding'])), atol=1e-5)
    with pytest.raises(ValueError, match='member 1 takes'): Ensemble([p, predictors['weld']])


def test_distillation_trains_a_smaller_student(runs, tmp_path):
    student = ['model.encoders={image: {name: small_cnn, in_channels: 1, widths: [8, 16]}}', 'model.aux_heads=null']
    s = distill(runs['inspection'], ROOT/'configs/inspection.yaml', QUICK + student + [f'runs_dir={tmp_path}'])
    assert s.metrics['status'] == 'completed' and np.isfinite(s.history[-1]['train_loss'])
    assert Predictor.from_run(s.dir, data_root=DATA).modalities == ['image']


def run_reading_other_data(run_dir, tmp:Path) -> tuple:
    "A copy of an inspection run whose config's data.root is a copy of the data with every voltage x10: preprocessing refitted there differs"
    other = tmp/'other-data'
    shutil.copytree(DATA/'inspection', other/'inspection')
    meta = pd.read_csv(other/'inspection'/'metadata.csv', dtype=str)
    meta['voltage'] = (meta['voltage'].astype(float) * 10).map(repr)
    meta.to_csv(other/'inspection'/'metadata.csv', index=False)
    run = tmp/'moved-run'
    shutil.copytree(run_dir, run)
    (run/'preprocessing.json').unlink(missing_ok=True)
    cfg = yaml.safe_load((run/'config.yaml').read_text())
    cfg['data']['root'] = str(other)
    (run/'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run, other


def test_data_root_default_is_the_configs_data_root(runs, predictors, tmp_path):
    "data_root=None refits the preprocessing on the config's data.root (here other data: voltage x10); data_root= replaces it"
    run, other = run_reading_other_data(runs['inspection'], tmp_path)
    original = predictors['inspection'].specs['metadata'].tabular['state']['mean']
    default = Predictor.from_run(run).specs['metadata'].tabular['state']['mean']  # column order: capacity_mah, voltage, weight_g
    assert np.isclose(default[1], 10 * original[1]) and default[0] == original[0], (default, original)
    assert Predictor.from_run(run, data_root=DATA).specs == predictors['inspection'].specs
    assert Predictor.from_run(run, data_root=other).specs == Predictor.from_run(run).specs


class ConstantTeacher(nn.Module):
    "A teacher answering the same logits for any batch"
    def __init__(self, logits): super().__init__(); self.register_buffer('logits', logits)
    def forward(self, batch): return SimpleNamespace(output={'logits': self.logits})


def distill_steps(alpha:float, steps:int=300) -> dict:
    "Fit free student logits with `Distill`'s loss against labels that disagree with the teacher on every sample"
    torch.manual_seed(0)
    teacher = torch.randn(8, 5) * 3
    labels = (teacher.argmax(-1) + 1) % 5
    student = torch.zeros(8, 5, requires_grad=True)
    cb = Distill(ConstantTeacher(teacher), temperature=2.0, alpha=alpha)
    learn = SimpleNamespace(batch={'target': labels}, loss_func=lambda preds, batch: F.cross_entropy(preds.output['logits'], batch['target']))
    kl = lambda: distillation_loss(student.detach(), teacher, temperature=1.0).item()
    opt, start = torch.optim.SGD([student], lr=0.5), kl()
    for _ in range(steps):
        learn.preds = SimpleNamespace(output={'logits': student})
        cb.get_loss(learn)
        opt.zero_grad(); learn.loss.backward(); opt.step()
    pred = student.detach().argmax(-1)
    return {'kl_start': start, 'kl_end': kl(), 'agrees_with_teacher': (pred == teacher.argmax(-1)).float().mean().item(),
            'agrees_with_labels': (pred == labels).float().mean().item()}


def test_distillation_term_acts():
    "alpha=0: exactly the task loss; alpha=1: exactly the KD term, and training on it pulls the student to the teacher against the labels"
    torch.manual_seed(1)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    learn = SimpleNamespace(preds=SimpleNamespace(output={'logits': s}), batch={'target': y},
                            loss_func=lambda preds, batch: F.cross_entropy(preds.output['logits'], batch['target']))
    for alpha, expected in ((0.0, F.cross_entropy(s, y)), (1.0, distillation_loss(s, t, 4.0))):
        Distill(ConstantTeacher(t), temperature=4.0, alpha=alpha).get_loss(learn)
        assert torch.equal(learn.loss, expected), (alpha, learn.loss, expected)
    assert distillation_loss(s, t) > 0 and distillation_loss(t, t).abs() < 1e-6
    kd, task = distill_steps(1.0), distill_steps(0.0)
    print('alpha=1:', kd, '\nalpha=0:', task)
    assert kd['kl_end'] < 0.05 * kd['kl_start'] and kd['agrees_with_teacher'] == 1.0 and kd['agrees_with_labels'] == 0.0
    assert task['kl_end'] > kd['kl_start'] and task['agrees_with_labels'] == 1.0 and task['agrees_with_teacher'] == 0.0


def test_tta_views_differ_from_the_identity_and_move_the_average(runs, predictors):
    "Each view changes the image (not the metadata), the model answers each differently, and TTA returns their average, not the identity's"
    p = predictors['inspection']
    ds = build_splits({**load_config(runs['inspection']/'config.yaml')['data'], 'cache': False})['test']
    batch = ds.collate([ds[i] for i in range(8)])
    x, views = batch['inputs']['image'], ['hflip', 'vflip', 'rot90']
    for v in views: assert TTA_VIEWS[v](x).shape == x.shape and not torch.equal(TTA_VIEWS[v](x), x), v
    with_view = lambda v: {**batch, 'inputs': {**batch['inputs'], 'image': TTA_VIEWS[v](x)}}
    outs = {v: p.outputs(with_view(v))['logits'] for v in ['identity'] + views}
    for v in views: assert (outs[v] - outs['identity']).abs().max() > 1e-4, f"the model is invariant to {v}: this test would prove nothing"
    got = TTAPredictor(p, ['identity'] + views).outputs(batch)['logits']
    expected = torch.stack(list(outs.values())).softmax(-1).mean(0).log()
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (got - outs['identity'].log_softmax(-1)).abs().max() > 1e-4  # a 2-epoch model moves ~1e-3 under a flip; float noise is ~1e-7


def test_detection_predictor_runs_the_onnx_export_like_pytorch(tmp_path):
    "DetectionPredictor.from_export (onnxruntime, TorchScript) gives the PyTorch predictor's boxes, frames batched; a frame of another size is refused"
    from mmfusion.deploy import DetectionPredictor
    from mmfusion.detection import MultiModalYOLO, export_detector
    torch.manual_seed(3)
    model = MultiModalYOLO({'thermal': 1, 'nvg': 1, 'visual_enhanced': 3}, 'yolo11n.yaml', base='thermal', imgsz=64).eval()
    with torch.no_grad():
        for p in model.fusions.parameters(): p.add_(torch.randn_like(p) * 0.05)
    paths = export_detector(model, tmp_path, (64, 64), ('onnx', 'torchscript'))
    g = torch.Generator().manual_seed(0)
    frames = [{'thermal': torch.rand(1, 64, 64, generator=g), 'nvg': torch.rand(1, 64, 64, generator=g), 'visual_enhanced': torch.rand(3, 64, 64, generator=g)}
              for _ in range(3)]
    frames[1].pop('nvg')
    ref = DetectionPredictor(model, conf=0.01).predict(frames)
    assert sum(len(d.boxes) for d in ref) > 0 and ref[1].missing == ['nvg']
    for fmt in ('onnx', 'torchscript'):
        got = DetectionPredictor.from_export(paths[fmt]['path'], conf=0.01).predict(frames)
        assert [d.missing for d in got] == [d.missing for d in ref] and [len(d.boxes) for d in got] == [len(d.boxes) for d in ref]
        for a, b in zip(got, ref):
            np.testing.assert_allclose([[x.x1, x.y1, x.x2, x.y2, x.confidence] for x in a.boxes], [[x.x1, x.y1, x.x2, x.y2, x.confidence] for x in b.boxes], atol=0.02)
    with pytest.raises(DataError, match='takes 64x64 frames'):
        DetectionPredictor.from_export(paths['onnx']['path']).predict({'thermal': torch.rand(1, 64, 128)})
