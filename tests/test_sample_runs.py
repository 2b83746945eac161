"""Every sample config trains into a run folder that `mmfusion evaluate` scores: weld (k-NN on embeddings), inspection
(classification), inspection_anomaly (RGB autoencoder + saved threshold) and solar (regression). Each config trains once
(few epochs: these tests check the plumbing and the consistency of the numbers, not how good the models are); the
reports are checked against the datasets they claim to describe."""
import hashlib, json, math, shutil
from pathlib import Path

import numpy as np, pandas as pd, pytest

from mmfusion.cli import main
from mmfusion.evaluation import NonFiniteError, anomaly_scores, evaluate_run, load_scorer, select_threshold
from mmfusion.model import load_checkpoint, save_checkpoint
from mmfusion.config import build_splits, load_config
from mmfusion.runs import train
from conftest import json_numbers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT/'data'
SHORT = {'weld': ['training.epochs=4'],  # enough epochs to exercise checkpoints, schedules and early stopping, no more
         'inspection': ['training.epochs=4'],
         'inspection_anomaly': ['training.epochs=8'],
         'solar': ['training.stages.0.epochs=2', 'training.stages.1.epochs=1']}
pytestmark = pytest.mark.filterwarnings('ignore:predictions of .* barely vary')  # three solar epochs are too few to fit kp; the report says so
TASKS = {'weld': 'embedding', 'inspection': 'classification', 'inspection_anomaly': 'anomaly', 'solar': 'regression'}



@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "name -> trained `Run`, each sample config trained once, on first use"
    base, done = tmp_path_factory.mktemp('runs'), {}
    def get(name):
        if name not in done:
            done[name] = train(ROOT/'configs'/f'{name}.yaml', [f'data.root={DATA}', f'runs_dir={base}', 'training.progress=false',
                                                                 'training.tensorboard=false', *SHORT[name]], verbose=False)
        return done[name]
    return get


@pytest.fixture(scope='module')
def evaluated(runs, tmp_path_factory):
    "(name, checkpoint, split) -> (report folder, metrics.json record), through `mmfusion evaluate` once each"
    base, done = tmp_path_factory.mktemp('evals'), {}
    def get(name, checkpoint='best', split=None):
        key = (name, checkpoint, split)
        if key not in done:
            out = base/f"{name}-{checkpoint}-{split or 'default'}"
            main(['evaluate', str(runs(name).dir), '--checkpoint', checkpoint, '--out', str(out), *(['--split', split] if split else [])])
            done[key] = out, json.loads((out/'metrics.json').read_text())
        return done[key]
    return get


def datasets(run):
    "The run's splits, rebuilt from its saved config exactly as evaluation rebuilds them"
    cfg = load_config(run.dir/'config.yaml')
    return cfg, build_splits({**cfg['data'], 'augment': None}, cfg['seed'])


def check_report(run, out:Path, rec:dict, split:str, checkpoint:str):
    "What every report must satisfy, whatever the task: files, finiteness, sizes, provenance, one prediction per sample"
    cfg, splits = datasets(run)
    ds = splits[split]
    for f in ('metrics.json', 'summary.md', 'predictions.csv', *rec['figures']): assert (out/f).is_file(), f
    assert rec['figures'] and all((out/f).read_bytes()[:4] == b'\x89PNG' for f in rec['figures'])
    assert all(math.isfinite(x) for x in json_numbers(rec))
    m = rec['metrics']
    assert m['task'] == TASKS[cfg['name']] and m['split'] == split and m['n'] == len(ds)
    assert rec['split_sizes'] == {'train': len(splits[cfg['data']['train']]), split: len(ds)}
    assert Path(rec['checkpoint']) == run.dir/'checkpoints'/f'{checkpoint}.pt'
    assert rec['config_hash'] == hashlib.sha256((run.dir/'config.yaml').read_bytes()).hexdigest()[:12]
    assert rec['config_hash'] in (out/'summary.md').read_text()
    h = m['headline']
    assert h['low'] <= h['value'] <= h['high']
    preds = pd.read_csv(out/'predictions.csv')
    assert sorted(preds['id'].astype(str)) == sorted(r.id for r in ds.records)  # every sample once
    return m, preds, ds


def check_classification(m, preds, ds):
    "Confusion counts, per-class support and the prediction table agree with the split and with each other"
    cm = np.array(m['confusion'])
    assert cm.sum() == len(ds) and sum(c['support'] for c in m['per_class'].values()) == len(ds)
    assert cm.sum(1).tolist() == np.bincount(ds.targets, minlength=len(ds.class_names)).tolist()
    assert [c['support'] for c in m['per_class'].values()] == cm.sum(1).tolist()
    assert math.isclose(m['accuracy'], np.trace(cm) / cm.sum())
    assert (preds['predicted'] == preds['target']).mean() == pytest.approx(m['accuracy'])  # the table holds the same decisions


@pytest.mark.parametrize('name', list(SHORT))
def test_training_writes_a_complete_run_folder(runs, name):
    run = runs(name)
    for f in ('config.yaml', 'history.csv', 'metrics.json', 'curves.png', 'checkpoints/best.pt', 'checkpoints/last.pt'): assert (run.dir/f).is_file(), f
    assert not [p.name for p in run.dir.rglob('*.tmp')]  # atomic writes leave no temporary files
    hist = pd.read_csv(run.dir/'history.csv')
    assert len(hist) == run.metrics['epochs'] == len(run.history) and np.isfinite(hist['train_loss']).all()
    m = json.loads((run.dir/'metrics.json').read_text())
    assert m['status'] == 'completed' and all(math.isfinite(x) for x in json_numbers(m))
    assert load_checkpoint(run.dir/'checkpoints/last.pt')['epoch'] == len(hist)


def test_weld_embeddings_are_scored_by_knn_on_the_training_split(runs, evaluated):
    out, rec = evaluated('weld')
    m, preds, ds = check_report(runs('weld'), out, rec, 'test', 'best')
    check_classification(m, preds, ds)
    assert m['k'] == 5 and m['metric'] == 'cosine'
    assert {r['setting'] for r in m['ablation']} >= {'all', 'without audio', 'only sensors'}


def test_inspection_classification_report_is_consistent(runs, evaluated):
    out, rec = evaluated('inspection')
    m, preds, ds = check_report(runs('inspection'), out, rec, 'test', 'best')
    check_classification(m, preds, ds)
    assert {'confusion.png', 'ablation.png'} <= set(rec['figures'])


def check_anomaly(m, preds, ds, normal):
    "Counts at the saved threshold follow from the per-sample scores; the labels are the split's"
    y = (np.array(ds.targets) != ds.class_names.index(normal)).astype(int)
    assert m['n_anomalous'] == y.sum() and 0 < y.sum() < len(y)
    by_id = dict(zip(map(str, preds['id']), zip(preds['score'], preds['flagged'], preds['target'])))
    score, flagged, target = map(np.array, zip(*(by_id[r.id] for r in ds.records)))
    assert (target == y).all() and (flagged == (score >= m['threshold'])).all()
    tp, fp = (flagged & (y == 1)).sum(), (flagged & (y == 0)).sum()
    assert m['recall'] == pytest.approx(tp / y.sum()) and m['fpr'] == pytest.approx(fp / (y == 0).sum())
    assert m['accuracy'] == pytest.approx((flagged == y).mean())


def test_inspection_anomaly_report_uses_the_threshold_saved_with_the_model(runs, evaluated):
    run = runs('inspection_anomaly')
    out, rec = evaluated('inspection_anomaly')
    m, preds, ds = check_report(run, out, rec, 'test', 'best')
    check_anomaly(m, preds, ds, 'normal')
    saved = load_scorer(run.dir/'checkpoints/best.pt').threshold
    assert m['threshold_rule'] == saved and m['threshold'] == saved['threshold']
    assert saved['method'] == 'youden' and saved['epoch'] == load_checkpoint(run.dir/'checkpoints/best.pt')['epoch']
    assert saved['n_scores'] == len(datasets(run)[1]['val'])  # chosen on the validation split, not on the test split
    assert m['roc_auc'] == pytest.approx(run.metrics['test']['roc_auc']) and 'anomaly.png' in rec['figures']


def test_solar_regression_report_is_consistent(runs, evaluated):
    out, rec = evaluated('solar')
    m, preds, ds = check_report(runs('solar'), out, rec, 'test', 'best')
    err = preds['predicted_0'] - preds['target_0']
    assert m['mae'] == pytest.approx(err.abs().mean(), rel=1e-5) and m['rmse'] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-5)
    assert sorted(preds['target_0']) == pytest.approx(sorted(float(t[0]) for t in ds.targets))


@pytest.mark.parametrize('name', ['weld', 'inspection_anomaly'])
def test_last_checkpoint_is_scored_when_asked(runs, evaluated, name):
    out, rec = evaluated(name, checkpoint='last')
    m, preds, ds = check_report(runs(name), out, rec, 'test', 'last')
    if name == 'inspection_anomaly':
        check_anomaly(m, preds, ds, 'normal')
        assert m['threshold_rule']['epoch'] == runs(name).metrics['epochs']  # the last epoch's threshold, with the last epoch's weights
    else: check_classification(m, preds, ds)


@pytest.mark.parametrize('name', ['inspection', 'inspection_anomaly', 'solar'])
def test_validation_split_is_scored_when_asked(runs, evaluated, name):
    out, rec = evaluated(name, split='val')
    m, preds, ds = check_report(runs(name), out, rec, 'val', 'best')
    if name == 'inspection': check_classification(m, preds, ds)
    if name == 'inspection_anomaly': check_anomaly(m, preds, ds, 'normal')


@pytest.mark.parametrize('checkpoint', ['best', 'last'])
def test_each_checkpoint_carries_the_threshold_of_its_own_weights(runs, checkpoint):
    run = runs('inspection_anomaly')
    scorer = load_scorer(run.dir/'checkpoints'/f'{checkpoint}.pt')
    cfg, splits = datasets(run)
    val = anomaly_scores(scorer, splits['val'].loader(batch_size=16), progress=False, normal_class=0)
    again = select_threshold(val.outputs, val.targets, **cfg['model']['threshold'])  # chosen afresh from these weights
    assert scorer.threshold['threshold'] == pytest.approx(again['threshold'], rel=1e-6)
    assert scorer.threshold['epoch'] == load_checkpoint(run.dir/'checkpoints'/f'{checkpoint}.pt')['epoch']


def test_the_threshold_rule_is_chosen_in_the_config(runs, tmp_path):
    run = train(ROOT/'configs/inspection_anomaly.yaml', [f'data.root={DATA}', f'runs_dir={tmp_path}', 'training.progress=false', 'training.epochs=3',
                'training.tensorboard=false', 'model.threshold={method: percentile, percentile: 90}'], verbose=False)
    scorer = load_scorer(run.dir/'checkpoints/best.pt')
    val = datasets(run)[1]['val']
    p = anomaly_scores(scorer, val.loader(batch_size=16), progress=False, normal_class=0)
    assert scorer.threshold['method'] == 'percentile'
    assert scorer.threshold['threshold'] == pytest.approx(np.percentile(p.outputs[p.targets == 0], 90), rel=1e-5)


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    (tmp_path/'checkpoints').mkdir()
    with pytest.raises(SystemExit) as e: main(['evaluate', str(tmp_path)])
    assert 'is not a run folder: it has no config.yaml' in str(e.value.code) and str(tmp_path) in str(e.value.code)


def test_a_nan_threshold_saved_with_an_anomaly_run_is_refused(runs, tmp_path):
    bad = tmp_path/'bad_run'
    shutil.copytree(runs('inspection_anomaly').dir, bad)
    ck = load_checkpoint(bad/'checkpoints/best.pt')
    ck['state_dict']['_extra_state']['threshold']['threshold'] = float('nan')
    save_checkpoint(ck, bad/'checkpoints/best.pt')
    with pytest.raises(NonFiniteError, match='anomaly threshold saved in .*best.pt'): evaluate_run(bad, progress=False)
    with pytest.raises(SystemExit) as e: main(['evaluate', str(bad)])
    assert 'NonFiniteError' in str(e.value.code) and 'anomaly threshold' in str(e.value.code)
    assert not (bad/'eval').exists()  # nothing was written from the bad threshold


def test_diagnose_an_anomaly_run(runs, tmp_path):
    "`mmfusion diagnose` on a scorer run: the checks that apply to an autoencoder, no false leakage between same-named files"
    run = runs('inspection_anomaly')
    main(['diagnose', str(run.dir), '--out', str(tmp_path)])
    rec = json.loads((tmp_path/'findings.json').read_text())
    checks = {f['check']: f for f in rec['findings']}
    assert {'score_separation', 'threshold', 'split_leakage', 'finite_inputs', 'lr_schedule'} <= set(checks)
    assert checks['split_leakage']['severity'] == 'ok', checks['split_leakage']  # train/normal/000 and test/normal/000 differ
    sep = checks['score_separation']['evidence']
    assert sep['n_normal'] + sep['n_anomalous'] == len(datasets(run)[1]['test']) and all(map(math.isfinite, json_numbers(sep)))
    assert (tmp_path/'report.html').is_file() and (tmp_path/'report.md').is_file()
