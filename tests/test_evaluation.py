"Checks of mmfusion.evaluation: written files exist and parse, numbers are finite and consistent, NaN is an error, writes are atomic"
import json, math, os, warnings
from pathlib import Path

import numpy as np, pandas as pd, pytest, torch, torch.nn as nn, torch.nn.functional as F
from sklearn import metrics as skm

from mmfusion.data import MultiModalDataset, tiny_dataset
from mmfusion.sample_data import sample_splits
from mmfusion.evaluation import (ConvAutoencoder, NonFiniteError, Predictions, ablation_verdict, anomaly_metrics, atomic_write, bootstrap_ci,
                                 classification_metrics, collect, evaluate_model, evaluate_predictions, fit_autoencoder,
                                 headline_metric, knn_predict, mask_modalities, measure_speed, modality_ablation,
                                 regression_metrics, select_threshold, write_json, write_report, TASKS, threshold_settings,
                                 evaluate_run, evaluate_fused_run, evaluate_anomaly_run)
from mmfusion.config import KindError, kind_verb
from mmfusion.model import tiny_model
from conftest import json_numbers

DATA = Path(__file__).resolve().parents[1]/'data'


@pytest.fixture(scope='module')
def splits():
    full = tiny_dataset(78)
    part = lambda recs, name: MultiModalDataset(recs, list(full.modalities.values()), full.task, full.class_names, name=name)
    return part(full.records[:48], 'train'), part(full.records[48:], 'test')


def trained(head, splits, loss):
    model = tiny_model(aux_heads=None, head=head)  # the library's tiny model, seeded
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for epoch in range(8):
        for b in splits[0].loader(batch_size=16, shuffle=True, seed=epoch):
            l = loss(model(b['inputs'], b['present'], b['masks']).output, b['target'])
            opt.zero_grad(); l.backward(); opt.step()
    return model.eval()


@pytest.fixture(scope='module')
def classifier(splits):
    return trained({'name': 'classification', 'n_classes': 3}, splits, F.cross_entropy)


def loaders(splits):
    return {'train': splits[0].loader(batch_size=8), 'test': splits[1].loader(batch_size=8)}


def no_temp_files(d:Path):
    return [p.name for p in d.rglob('*') if p.name.startswith('.') or p.suffix == '.tmp']


def test_classification_report_files_parse_and_agree(classifier, splits, tmp_path):
    m = evaluate_model(classifier, loaders(splits), 'classification', tmp_path, n_boot=100, checkpoint='best.pt',
                       config_hash='abc123', progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {'metrics.json', 'summary.md', 'predictions.csv', 'confusion.png', 'ablation.png'} <= names
    assert no_temp_files(tmp_path) == []
    saved = json.loads((tmp_path/'metrics.json').read_text())  # strict JSON: NaN would not parse back as a number
    assert all(math.isfinite(x) for x in json_numbers(saved))
    n = len(splits[1])
    cm = np.array(saved['metrics']['confusion'])
    assert cm.sum() == n and saved['metrics']['n'] == n
    assert sum(c['support'] for c in saved['metrics']['per_class'].values()) == n
    assert saved['split_sizes'] == {'train': 48, 'test': 30}
    assert (saved['checkpoint'], saved['config_hash']) == ('best.pt', 'abc123') and saved['timestamp']
    assert saved['metrics']['accuracy'] == pytest.approx(np.trace(cm) / n)
    head = saved['metrics']['headline']
    assert head['name'] == 'f1_macro' and head['low'] <= head['value'] <= head['high']
    ablation = pd.DataFrame(saved['metrics']['ablation']).set_index('setting')
    assert len(ablation) == 9 and ablation.loc['all', 'change'] == 0
    assert ablation.loc['all', 'metric'] == pytest.approx(head['value'])
    speed = saved['metrics']['speed']
    assert speed['latency_ms']['median'] > 0 and speed['throughput']['median'] > 0
    preds = pd.read_csv(tmp_path/'predictions.csv')
    assert len(preds) == n and set(preds['id']) == {r.id for r in splits[1].records}
    assert (preds['predicted'] == preds['target']).mean() == pytest.approx(saved['metrics']['accuracy'])
    for png in saved['figures']: assert (tmp_path/png).read_bytes()[:4] == b'\x89PNG'
    summary = (tmp_path/'summary.md').read_text()
    assert 'f1_macro' in summary and '![confusion](confusion.png)' in summary and 'abc123' in summary
    assert m['accuracy'] == saved['metrics']['accuracy']


def test_embedding_task_uses_knn_on_train(splits, tmp_path, monkeypatch):
    "k-NN is fitted once on the training embeddings: its votes give the metrics, the interval and predictions.csv"
    import mmfusion.evaluation as ev
    def first_dims_as_logits(out, y): return F.cross_entropy(out[:, :3] * 10, y)  # pulls the classes apart
    model = trained({'name': 'embedding', 'dim': 8}, splits, first_dims_as_logits)
    fits, real = [], ev.knn_predict
    monkeypatch.setattr(ev, 'knn_predict', lambda *a, **kw: fits.append(1) or real(*a, **kw))
    m = evaluate_model(model, loaders(splits), 'embedding', tmp_path, k=5, knn_metric='euclidean', n_boot=50, speed=False, ablation=False, progress=False)
    assert len(fits) == 1
    assert (m['k'], m['metric']) == (5, 'euclidean')
    assert np.array(m['confusion']).sum() == len(splits[1])
    assert (tmp_path/'embeddings.png').exists() and no_temp_files(tmp_path) == []
    preds = pd.read_csv(tmp_path/'predictions.csv')
    assert (preds.predicted == preds.target).mean() == pytest.approx(m['accuracy'])
    majority = np.bincount(splits[0].targets).argmax()  # the trivial baseline: the training split's majority class for everyone
    assert m['headline']['baseline'] == pytest.approx(skm.f1_score(splits[1].targets, [majority] * len(splits[1]), average='macro', zero_division=0))


def test_tasks_registry_holds_what_differs_per_task():
    "One entry per task: its headline, its direction, its trivial baseline; an unknown task is a KeyError naming the known ones"
    tasks = ('classification', 'regression', 'embedding', 'anomaly')
    assert set(tasks) <= set(TASKS.names)
    assert [TASKS[t].headline for t in tasks] == ['f1_macro', 'mae', 'f1_macro', 'roc_auc']
    assert [t for t in tasks if TASKS[t].lower_is_better] == ['regression']
    p = Predictions(np.array([0, 1, 1]), np.eye(3), list('abc'))
    base = TASKS['classification'].baseline([1, 1, 0, 2], p)
    assert base.outputs.argmax(1).tolist() == [1, 1, 1] and headline_metric('classification', 'accuracy')(base) == pytest.approx(2 / 3)
    r = Predictions(np.array([[0.], [4.]]), np.zeros((2, 1)), ['a', 'b'])
    assert TASKS['regression'].baseline(np.array([[1.], [3.]]), r).outputs.ravel().tolist() == [2., 2.]
    a = Predictions(np.array([0, 1, 0, 1]), np.array([.1, .9, .2, .8]), list('abcd'))
    assert headline_metric('anomaly')(a) == 1.0 and headline_metric('anomaly')(TASKS['anomaly'].baseline(None, a)) == 0.5
    m, _ = evaluate_predictions('anomaly', a, threshold=.5, n_boot=0, plots=False)
    assert m['headline'] == {'name': 'roc_auc', 'value': 1.0, 'baseline': 0.5}
    with pytest.raises(KeyError, match="unknown task 'ranking'"): evaluate_predictions('ranking', a)


def test_threshold_settings_are_checked_in_one_place():
    assert threshold_settings() == {'method': 'percentile', 'percentile': 95., 'max_fpr': .05}
    assert threshold_settings({'method': 'youden'})['method'] == 'youden'
    with pytest.raises(ValueError, match='model.threshold.method must be one of'): threshold_settings({'method': 'otsu'}, 'model.threshold')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pct'\]"): threshold_settings({'pct': 90})
    with pytest.raises(ValueError, match='percentile must be in'): select_threshold([.1, .2, .3], percentile=120)


def test_evaluate_run_dispatches_on_the_declared_kind(tmp_path):
    "evaluate_run asks the run's declared kind for its verb; a kind nobody registered is a KindError that says how to load every kind"
    assert kind_verb('fused', 'evaluate') is evaluate_fused_run and kind_verb('anomaly', 'evaluate') is evaluate_anomaly_run
    (tmp_path/'config.yaml').write_text('kind: no_such_kind\n')
    with pytest.raises(KindError, match="unknown kind of run 'no_such_kind'.*import mmfusion.runs"): evaluate_run(tmp_path)
    with pytest.raises(FileNotFoundError, match='no config.yaml'): evaluate_run(tmp_path/'missing')


def test_knn_refuses_a_sample_in_both_splits():
    X = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(ValueError, match='in both train and test'):
        knn_predict(X, [0, 1, 0, 1, 0, 1], X[:2], k=3, train_ids=list('abcdef'), test_ids=['a', 'z'])


@pytest.mark.parametrize('seed', range(5))
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, s = rng.integers(0, 4, 50), rng.normal(size=(50, 4))
    m, p = classification_metrics(y, s), s.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert m['f1_macro'] == pytest.approx(skm.f1_score(y, p, average='macro', zero_division=0))
        assert m['recall_weighted'] == pytest.approx(skm.recall_score(y, p, average='weighted', zero_division=0))
        assert m['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(y, p))
    if len(set(y)) == 4:
        probs = np.exp(s) / np.exp(s).sum(1, keepdims=True)
        assert m['roc_auc_ovr'] == pytest.approx(skm.roc_auc_score(y, probs, multi_class='ovr'))


def test_nan_scores_and_thresholds_raise():
    s, y = np.array([.1, .4, .35, .8]), np.array([0, 0, 1, 1])
    with pytest.raises(NonFiniteError, match='anomaly threshold'): anomaly_metrics(s, y, {'threshold': float('nan')})
    with pytest.raises(NonFiniteError, match='anomaly threshold'): anomaly_metrics(s, y, float('inf'))
    with pytest.raises(NonFiniteError, match="samples \\['c'\\]"): anomaly_metrics([.1, .4, np.nan, .8], y, .3, ids=list('abcd'))
    with pytest.raises(NonFiniteError): select_threshold([.1, np.nan, .3])
    bad = Predictions(y, np.array([.1, np.nan, .35, .8]), list('abcd'))
    with pytest.raises(NonFiniteError): evaluate_predictions('anomaly', bad, threshold=.3, n_boot=0)
    with pytest.raises(NonFiniteError, match='classification outputs'): classification_metrics([0, 1], [[0., np.nan], [1., 0.]])


def test_report_with_nan_writes_nothing(tmp_path):
    with pytest.raises(NonFiniteError, match='metrics.r2 is nan'): write_report(tmp_path/'out', {'mae': .1, 'r2': float('nan')})
    assert not (tmp_path/'out').exists() or list((tmp_path/'out').iterdir()) == []


def test_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = write_json({'accuracy': .9}, tmp_path/'metrics.json')
    def crash(tmp): Path(tmp).write_text('{"acc'); raise RuntimeError('disk full')
    with pytest.raises(RuntimeError): atomic_write(path, crash)
    assert json.loads(path.read_text()) == {'accuracy': .9}
    assert sorted(os.listdir(tmp_path)) == ['metrics.json']


def test_regression_collapse_is_flagged_and_written(tmp_path):
    y = np.linspace(-3, 3, 40)[:, None]
    const = Predictions(y, np.full_like(y, -.2), [str(i) for i in range(40)])
    with pytest.warns(UserWarning, match='barely vary'):
        m, figs = evaluate_predictions('regression', const, output_names=['dst'], n_boot=100)
    assert m['collapsed_outputs'] == ['dst'] and m['per_output']['dst']['pearson_r'] is None
    assert m['mae'] == pytest.approx(np.abs(y + .2).mean())
    write_report(tmp_path, m, figs)
    assert json.loads((tmp_path/'metrics.json').read_text())['metrics']['pearson_r'] is None


def test_bootstrap_is_seeded():
    y, p = np.arange(40) % 3, (np.arange(40) * 7) % 3
    acc = lambda a, b: (a == b).mean()
    assert bootstrap_ci(acc, y, p, n_boot=300, seed=1) == bootstrap_ci(acc, y, p, n_boot=300, seed=1)
    assert bootstrap_ci(acc, y, p, n_boot=300, seed=1) != bootstrap_ci(acc, y, p, n_boot=300, seed=2)



def test_ablation_verdict_follows_the_interval_not_the_point():
    "A drop counts only when its whole interval clears min_gain; an interval at 0 within +-negligible is 'ignored'; one straddling 0 widely is 'inconclusive'"
    assert ablation_verdict(0.001, 0.2) == 'contributes' and ablation_verdict(0.001, 0.2, min_gain=0.01) == 'inconclusive'
    assert ablation_verdict(-0.3, -0.001) == 'hurts'
    assert ablation_verdict(-0.009, 0.009) == 'ignored' and ablation_verdict(-0.009, 0.011) == 'inconclusive'
    assert ablation_verdict(-0.02, 0.02, negligible=0.05) == 'ignored'
    import mmfusion.detection as det, mmfusion.segmentation as seg
    assert det.ablation_verdict is ablation_verdict and seg.ablation_verdict is ablation_verdict  # one home, imported where used


class ImageOnly(nn.Module):
    "Uses the image alone; the other modalities must not matter"
    modalities = ['image', 'audio', 'series', 'tabular']
    def __init__(self):
        super().__init__(); self.lin = nn.Linear(3, 3)
    def forward(self, inputs, present, masks=None):
        return self.lin(inputs['image'].mean((2, 3)) * present[:, :1])


def test_ablation_of_an_ignored_modality_changes_nothing(splits):
    torch.manual_seed(0)
    table = modality_ablation(ImageOnly(), splits[1].loader(batch_size=8), headline_metric('classification', 'accuracy'))
    for m in ('audio', 'series', 'tabular'): assert table.loc[f'without {m}', 'change'] == 0
    assert table.loc['only image', 'metric'] == table.loc['all', 'metric']
    b = next(iter(splits[1].loader(batch_size=4)))
    assert not mask_modalities(b, ['image'])['present'][:, 0].any() and mask_modalities(b, ['image'])['inputs']['image'].abs().sum() == 0


def test_speed_numbers_are_ordered(classifier, splits):
    b = next(iter(splits[1].loader(batch_size=4)))
    s = measure_speed(classifier, b, batch_size=8, n_warmup=1, n_runs=5)
    for part in (s['latency_ms'], s['throughput']): assert 0 < part['p10'] <= part['median'] <= part['p90']
    assert s['throughput']['batch_size'] == 8 and not classifier.training


def test_reference_autoencoder_finds_defects_and_keeps_its_threshold(tmp_path):
    anom = sample_splits('inspection_anomaly', DATA)
    torch.manual_seed(0)
    ae = ConvAutoencoder()
    losses = fit_autoencoder(ae, anom['train'].loader(batch_size=8, shuffle=True), epochs=25)
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0]
    lo = {s: anom[s].loader(batch_size=16) for s in ('train', 'test')}
    m = evaluate_model(ae, lo, 'anomaly', tmp_path, n_boot=100, progress=False)  # threshold: 95th percentile of train scores
    assert m['roc_auc'] > 0.8 and m['threshold_rule']['method'] == 'percentile'
    assert m['n'] == len(anom['test']) and {'metrics.json', 'anomaly.png', 'summary.md'} <= {p.name for p in tmp_path.iterdir()}
    ae.threshold = m['threshold_rule']
    ae2 = ConvAutoencoder(); ae2.load_state_dict(ae.state_dict())
    assert ae2.threshold == ae.threshold


def test_collect_keeps_rows_aligned_and_restores_mode(classifier, splits):
    classifier.train()
    a = collect(classifier, splits[1].loader(batch_size=8), progress=False)
    b = collect(classifier, splits[1].loader(batch_size=8, shuffle=True, seed=3), keep_fused=True, progress=False)
    assert classifier.training
    classifier.eval()
    order = [b.ids.index(i) for i in a.ids]
    assert np.array_equal(b.targets[order], a.targets) and np.allclose(b.outputs[order], a.outputs, atol=1e-5)
    assert b.fused.shape == (len(splits[1]), 16) and a.fused is None
