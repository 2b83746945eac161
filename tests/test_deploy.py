"""Deployment on trained sample runs: the Predictor reads raw files as training did, exports match PyTorch, TTA/ensembles/distillation keep their invariants."""
from pathlib import Path

import numpy as np, pytest, torch

from mmfusion.data import DataError
from mmfusion.deploy import (EXPORT_FORMATS, Ensemble, ExportedModel, Predictor, TTAPredictor, check_export, distill, export_model, flat_inputs,
                             predictor_outputs)
from mmfusion.training import build_splits, load_config, train

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


def test_data_root_default(runs, predictors):
    # a run's config names data.root; overriding it changes where the training data is read, nothing else
    p = Predictor.from_run(runs['inspection'], data_root=DATA)
    assert p.specs == predictors['inspection'].specs


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
