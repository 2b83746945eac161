"Positive controls for mmfusion.diagnosis: each check flags a purpose-built broken model or dataset, and a healthy model gets no problem"
import json

import numpy as np, pytest, torch, torch.nn as nn

from mmfusion.data import MultiModalDataset, StratifiedBatchSampler, tiny_dataset
from mmfusion.diagnosis import (CHECKS, as_batches, channel_importance, class_balance, contrastive_batches, default_loss, diagnose,
                                diagnose_run, feature_magnitudes, finite_inputs, fusion_attention, gradient_flow, lr_schedule,
                                modality_contribution, output_dependence, saliency, shapley_values, solar_toy_dataset, split_leakage,
                                temporal_behaviour)
from mmfusion.model import TINY_MODEL, build_model

TINY_CFG = {**TINY_MODEL, 'aux_heads': {'weight': 0.3}}  # the library's tiny model, an auxiliary head on every modality
SOLAR_CFG = {'encoders': {'frames': {'name': 'conv_lstm', 'in_channels': 3, 'hidden': 8},
                          'wind': {'name': 'series_transformer', 'in_channels': 4, 'dim': 8, 'heads': 2, 'depth': 1, 'dropout': 0.0}},
             'fusion': {'name': 'concat', 'dim': 16}, 'head': {'name': 'regression', 'n_outputs': 1}}


def fit(model, ds, epochs, lr=1e-2, seed=0):
    "A few epochs of AdamW with the library's default loss (main + auxiliary heads)"
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for b in ds.loader(batch_size=8, shuffle=True, seed=seed):
            opt.zero_grad(); default_loss(model(b), b).backward(); opt.step()
    return model.eval()


@pytest.fixture(scope='module')
def healthy():
    torch.manual_seed(0)
    return fit(build_model(TINY_CFG), tiny_dataset(48), 12)


@pytest.fixture(scope='module')
def tiny_batches():
    return as_batches(tiny_dataset(24, seed=2), batch_size=12)


@pytest.fixture(scope='module')
def solar():
    return as_batches(solar_toy_dataset(16, steps=5, seed=1), batch_size=8)


def solar_model(seed=0):
    torch.manual_seed(seed)
    return build_model(SOLAR_CFG).eval()


@pytest.fixture(scope='module')
def solar_trained():
    return fit(solar_model(), solar_toy_dataset(32), 15, lr=3e-3)


def by(findings, check, subject=None):
    return [f for f in findings if f.check == check and (subject is None or f.subject == subject)]


def severity(findings, check, subject=None):
    fs = by(findings, check, subject)
    assert fs, f"no {check} finding for {subject}"
    return max((f.severity for f in fs), key=['ok', 'warning', 'problem'].index)


# --- negative control
def test_healthy_model_has_no_problem(healthy, tiny_batches):
    d = diagnose(healthy, tiny_batches, splits={'train': tiny_dataset(48), 'test': tiny_dataset(24, seed=2)}, train_labels=tiny_dataset(48).targets)
    print(d)
    assert not d.problems, repr(d)
    checks = {f.check for f in d.findings}
    assert {'output_dependence', 'modality_contribution', 'feature_magnitude', 'gradient_flow', 'temporal', 'channel_importance',
            'saliency', 'finite_inputs', 'class_balance', 'split_leakage'} <= checks
    assert all(np.isfinite(f.evidence.get('score_all', 0.)) for f in d.findings)


# --- 1. constant output
def test_constant_regressor_flagged(solar, solar_trained):
    m = solar_model(); m.load_state_dict(solar_trained.state_dict())  # a copy (deepcopy fails on the ConvLSTM's kept hidden states)
    with torch.no_grad(): m.head.net[-1].weight.zero_()  # the output is the bias: the same for every input
    f = output_dependence(m, solar)[0]
    assert f.severity == 'problem' and f.evidence['spread_ratio'] < 1e-6 and f.evidence['swap_change'] < 1e-6
    assert severity(output_dependence(solar_trained, solar), 'output_dependence') == 'ok'


# --- 2. modality contribution
def test_dropped_modality_flagged(healthy, tiny_batches):
    h = healthy.fusion.register_forward_pre_hook(lambda mod, args: ({k: v for k, v in args[0].items() if k != 'image'}, *args[1:]))
    try:
        fs = modality_contribution(healthy, tiny_batches)
    finally: h.remove()
    img = by(fs, 'modality_contribution', 'image')[0]
    assert img.severity == 'problem' and abs(img.evidence['shapley']) < 1e-9
    assert all(abs(v) < 1e-9 for v in img.evidence['drop'].values())
    assert severity(modality_contribution(healthy, tiny_batches), 'modality_contribution', 'image') == 'ok'


def test_shapley_is_exact_on_an_additive_game():
    w = {'a': 1., 'b': 2., 'c': 0.}
    phi = shapley_values(lambda S: sum(w[p] for p in S) + (3. if {'a', 'b'} <= S else 0.), list(w))
    assert phi == pytest.approx({'a': 2.5, 'b': 3.5, 'c': 0.})


# --- 3. feature magnitude
def test_feature_imbalance_flagged(solar):
    m = solar_model()
    m.encoders['wind'].register_forward_hook(lambda mod, i, o: o._replace(tokens=o.tokens * 1000, pooled=o.pooled * 1000))
    f = feature_magnitudes(m, solar)[0]
    assert f.severity == 'problem' and f.subject == 'frames' and f.evidence['ratio'] > 100
    normed = build_model({**SOLAR_CFG, 'fusion': {'name': 'concat', 'dim': 16, 'norm_before_fusion': True}}).eval()
    normed.encoders['wind'].register_forward_hook(lambda mod, i, o: o._replace(tokens=o.tokens * 1000, pooled=o.pooled * 1000))
    assert feature_magnitudes(normed, solar)[0].severity == 'ok'


# --- 4. gradient flow
def test_frozen_by_mistake_flagged(tiny_batches):
    torch.manual_seed(0); m = build_model(TINY_CFG)
    for p in m.encoders['image'].parameters(): p.requires_grad_(False)
    f = by(gradient_flow(m, tiny_batches), 'gradient_flow', 'image')[0]
    assert f.severity == 'problem' and 'by mistake' in f.summary
    torch.manual_seed(0); ok = build_model({**TINY_CFG, 'freeze': ['encoders.image']})
    assert by(gradient_flow(ok, tiny_batches), 'gradient_flow', 'image')[0].severity == 'ok'


def test_dead_encoder_flagged(tiny_batches):
    torch.manual_seed(0); m = build_model({k: v for k, v in TINY_CFG.items() if k != 'aux_heads'})
    m.fusion.register_forward_pre_hook(lambda mod, args: ({k: v for k, v in args[0].items() if k != 'image'}, *args[1:]))
    f = by(gradient_flow(m, tiny_batches), 'gradient_flow', 'image')[0]
    assert f.severity == 'problem' and f.evidence['no_grad_fraction'] == 1


def test_gradient_check_leaves_grads_untouched(tiny_batches):
    torch.manual_seed(0); m = build_model(TINY_CFG)
    gradient_flow(m, tiny_batches)
    assert all(p.grad is None for p in m.parameters())


# --- 5. temporal
class Forgetful(nn.Module):
    "A ConvLSTM cell that starts from a zero state at every step: its output never depends on earlier steps"
    def __init__(self, cell): super().__init__(); self.cell = cell
    def forward(self, x, h, c): return self.cell(x, torch.zeros_like(h), torch.zeros_like(c))


def test_convlstm_without_state_flagged(solar):
    m = solar_model()
    enc = m.encoders['frames']
    enc.cells = nn.ModuleList(Forgetful(c) for c in enc.cells)
    fs = temporal_behaviour(m, solar, 'frames')
    assert any(f.severity == 'problem' and 'not carried' in f.summary for f in fs)
    assert fs[0].evidence['memory'] < 1e-6
    healthy = temporal_behaviour(solar_model(), solar, 'frames')
    assert not [f for f in healthy if 'not carried' in f.summary] and healthy[0].evidence['memory'] > 0.01


# --- 6. channels
def test_unused_channel_flagged(solar, solar_trained):
    m = solar_model(); m.load_state_dict(solar_trained.state_dict())  # a copy (deepcopy fails on the ConvLSTM's kept hidden states)
    with torch.no_grad(): m.encoders['frames'].stem[0].weight[:, 2] = 0
    f = channel_importance(m, solar, 'frames', ['193', '211', 'magnetogram'])[0]
    assert f.severity == 'warning' and f.evidence['importance']['magnetogram'] == 0
    assert channel_importance(solar_trained, solar, 'frames')[0].severity == 'ok'


# --- 7. saliency
def test_fixed_saliency_flagged(healthy, tiny_batches):
    ramp = torch.linspace(0, 1, 16).expand(16, 16)
    h = healthy.encoders['image'].body.register_forward_pre_hook(lambda mod, args: (ramp.expand_as(args[0]).clone() + 0 * args[0],))
    try: f = saliency(healthy, tiny_batches, 'image')[0]
    finally: h.remove()
    assert f.severity == 'problem' and f.evidence['correlation_across_inputs'] > 0.95
    assert saliency(healthy, tiny_batches, 'image')[0].severity == 'ok'


def test_gradcam_per_step_for_convlstm(solar):
    f = saliency(solar_model(), solar, 'frames')[0]
    assert f.evidence['map_shape'][0] == 5 and f.figures


# --- 8. fusion attention
def test_starved_attention_flagged(tiny_batches):
    torch.manual_seed(0)
    m = build_model({**TINY_CFG, 'fusion': {'name': 'weighted', 'dim': 16}}).eval()
    with torch.no_grad(): m.fusion.weights['tabular'].fill_(-20.)
    f = fusion_attention(m, tiny_batches)[0]
    assert f.severity == 'warning' and f.subject == 'tabular'
    assert m.fusion.return_attention is False  # restored
    torch.manual_seed(0)
    assert fusion_attention(build_model({**TINY_CFG, 'fusion': {'name': 'weighted', 'dim': 16}}), tiny_batches)[0].severity == 'ok'


# --- 9. training set-up
def test_supcon_batches_without_positives_flagged():
    labels = np.repeat(np.arange(40), 2)
    random_batches = np.random.default_rng(0).permutation(len(labels)).reshape(-1, 8).tolist()
    assert contrastive_batches(labels, random_batches)[0].severity == 'problem'
    stratified = StratifiedBatchSampler(labels, 8, k=2, seed=0).global_batches()
    assert contrastive_batches(labels, stratified)[0].severity == 'ok'


def test_leakage_flagged():
    train, test = tiny_dataset(24, seed=0), tiny_dataset(12, seed=0)  # same seed: the test samples are train samples
    f = split_leakage({'train': train, 'test': test})[0]
    assert f.severity == 'problem' and f.evidence['shared_ids'] == 12
    assert split_leakage({'train': train, 'test': tiny_dataset(12, seed=5)})[0].severity == 'ok'


def test_balance_nan_and_schedule_flagged(tiny_batches):
    assert class_balance([0] * 95 + [1] * 5)[0].severity == 'problem'
    assert class_balance([0, 1, 2] * 10)[0].severity == 'ok'
    bad = {**tiny_batches[0], 'inputs': {**tiny_batches[0]['inputs'], 'image': tiny_batches[0]['inputs']['image'].clone()}}
    bad['inputs']['image'][3, 0, 0, 0] = float('nan')
    f = finite_inputs([bad])[0]
    assert f.severity == 'problem' and f.evidence['samples'] == [bad['ids'][3]]
    assert finite_inputs(tiny_batches)[0].severity == 'ok'
    flat = [{'epoch': e, 'lr': 1e-3} for e in range(5)]
    assert lr_schedule(flat, {'name': 'cosine'})[0].severity == 'problem'
    assert lr_schedule([{'epoch': e, 'lr': 1e-3 * (5 - e)} for e in range(5)], {'name': 'cosine'})[0].severity == 'ok'


# --- 10. detection: tests/test_detection.py (the check lives in mmfusion.detection)


# --- reports
def test_report_files(solar, solar_trained, tmp_path):
    d = diagnose(solar_trained, solar, out=tmp_path, title='solar toy')
    rec = json.loads((tmp_path/'findings.json').read_text())
    assert rec['title'] == 'solar toy' and len(rec['findings']) == len(d.findings)
    assert all(f['severity'] in ('ok', 'warning', 'problem') and 'evidence' in f and 'remedies' in f for f in rec['findings'])
    page = (tmp_path/'report.html').read_text()
    assert page.count('data:image/png;base64,') >= 3
    md = (tmp_path/'report.md').read_text()
    assert '## [' in md and all((tmp_path/l.split('(')[1].rstrip(')')).is_file() for l in md.splitlines() if l.startswith('!['))
    assert not list(tmp_path.glob('.*.tmp'))  # atomic writes leave no temporary file


def test_diagnose_run(tmp_path):
    from mmfusion.kinds import train
    run = train('configs/smoke.yaml', ['training.epochs=1', f'runs_dir={tmp_path}', 'training.tensorboard=false', 'training.progress=false'], verbose=False)
    d = diagnose_run(run.dir, max_samples=24)
    assert (run.dir/'diagnosis'/'findings.json').is_file() and (run.dir/'diagnosis'/'report.html').is_file()
    checks = {f.check for f in d.findings}
    assert {'lr_schedule', 'split_leakage', 'class_balance', 'gradient_flow'} <= checks
    assert severity(d.findings, 'split_leakage') == 'ok'


# --- what is scored: the run's primary head, named in every finding (issue 13: the first head of a multi-task model was scored as logits)
def test_multi_task_model_scored_on_its_primary_head(tiny_batches):
    from mmfusion.diagnosis import predict, primary_head
    cfg = {**{k: v for k, v in TINY_CFG.items() if k != 'aux_heads'},
           'head': {'name': 'multi_task', 'heads': {'embedding': {'name': 'embedding', 'dim': 8}, 'logits': {'name': 'classification', 'n_classes': 3}}}}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert primary_head(model) == 'embedding'
    with pytest.raises(ValueError, match='say which one'): predict(model, tiny_batches)  # never silently the first head
    checks = ('output_dependence', 'modality_contribution', 'modality_interaction')
    d = diagnose(model, tiny_batches, checks=checks, reference=tiny_dataset(48), n_boot=100)
    contrib = by(d.findings, 'modality_contribution')
    assert contrib and all(f.evidence['head'] == 'embedding' and f.evidence['score'].startswith('k-NN (k=5, cosine)') for f in contrib)
    assert by(d.findings, 'output_dependence')[0].evidence['head'] == 'embedding'
    d = diagnose(model, tiny_batches, checks=checks, head='logits', n_boot=100)
    assert all(f.evidence['head'] == 'logits' and 'probability of the true class' in f.evidence['score'] for f in by(d.findings, 'modality_contribution'))
    with pytest.raises(KeyError, match='no head'): diagnose(model, tiny_batches, checks=checks, head='logit')


# --- the verdicts carry intervals; a modality whose content is removed without changing the output gets share exactly 0
def test_contribution_evidence_has_intervals(healthy, tiny_batches):
    for f in modality_contribution(healthy, tiny_batches, n_boot=200):
        ev = f.evidence
        assert ev['verdict'] in ('contributes', 'contributes little', 'inconclusive', 'uninformative')  # a healthy model ignores nothing
        assert f.severity != 'problem'
        lo, hi = ev['share_ci']
        assert lo <= ev['shapley_share'] <= hi and ev['n'] == 24
        assert (ev['verdict'] == 'inconclusive') == ('samples_needed' in ev)


# --- ablation agreement: a verdict the evaluation's ablation contradicts is a problem
def test_ablation_disagreement_is_a_problem(healthy, tiny_batches):
    from mmfusion.diagnosis import ablation_agreement
    fs = modality_contribution(healthy, tiny_batches, n_boot=200)
    verdict = {f.subject: f.evidence['verdict'] for f in fs}
    m = next(m for m, v in verdict.items() if v == 'contributes')
    rec = lambda change: {'split_sizes': {'test': 24}, 'metrics': {'task': 'classification', 'split': 'test', 'headline': {'name': 'f1_macro'},
                          'ablation': [{'setting': 'all', 'metric': .9, 'change': 0.}, {'setting': f'without {m}', 'metric': .9 + change, 'change': change},
                                       {'setting': f'only {m}', 'metric': .4, 'change': -.5}]}}  # the ablation can show a loss
    bad, = ablation_agreement(fs, rec(0.), 'valid')  # 'contributes', but removing it changes nothing
    good, = ablation_agreement(fs, rec(-.3), 'valid')
    assert (bad.severity, good.severity) == ('problem', 'ok') and bad.subject == good.subject == m
    small, = ablation_agreement(fs, rec(-.03), 'valid')  # a real loss below the 'small' tolerance (under a sample's worth): no contradiction
    assert small.severity == 'ok', small.summary
    assert (bad.evidence['diagnosed_split'], bad.evidence['ablation_split']) == ('valid', 'test')
    flat = rec(0.); flat['metrics']['ablation'] = [{**r, 'metric': .9, 'change': 0.} for r in flat['metrics']['ablation']]
    blind, = ablation_agreement(fs, flat, 'valid')  # no setting moves the metric (decisions never change): nothing to contradict
    assert blind.severity == 'ok' and blind.evidence['ablation_sensitive'] is False and 'cannot tell' in blind.summary


# --- section 7: batches without negatives (a single class: SupCon has nothing to push apart)
def test_single_class_batches_flagged():
    labels = np.repeat([0, 1], 40)
    by_class = np.arange(80).reshape(-1, 8).tolist()  # every batch holds one class
    fs = contrastive_batches(labels, by_class)
    assert [f.severity for f in fs] == ['problem'] and fs[0].evidence['batches_without_negatives'] == 10 and 'no negatives' in fs[0].summary
    mixed = StratifiedBatchSampler(labels, 8, k=2, seed=0).global_batches()
    fs = contrastive_batches(labels, mixed)
    assert [f.severity for f in fs] == ['ok'] and fs[0].evidence['batches_without_negatives'] == 0


def test_as_batches_mixes_class_sorted_files():
    "Files sorted by class would give one-class batches (donors of the same class hide a modality's use) and a first-N subsample of one class"
    from mmfusion.data import from_arrays
    ds = from_arrays({'x': np.zeros((33, 2), 'f4')}, [0] * 17 + [1] * 16)  # sorted by class; 33 = 2 x 16 + 1
    batches = as_batches(ds, max_samples=64, batch_size=16)
    assert all(len(set(b['target'].tolist())) == 2 for b in batches)  # every batch holds both classes
    assert min(len(b['ids']) for b in batches) > 1 and sum(len(b['ids']) for b in batches) == 33  # no batch of one, nothing lost
    first = as_batches(ds, max_samples=8, batch_size=8)
    assert len(set(first[0]['target'].tolist())) == 2  # a subsample, not the first class's files
    assert [b['ids'] for b in as_batches(ds, 64, 16)] == [b['ids'] for b in batches]  # seeded


# --- one home per task and per kind (issue 14): no branching on task names, no guessing a run's kind
def test_each_task_reads_outputs_through_its_entry():
    "The diagnosis's per-task parts live in TASKS[task].diagnosis: classification compares probabilities, the others values"
    from mmfusion.evaluation import TASKS
    a, b = torch.tensor([[3., 0.]]), torch.tensor([[0., 3.]])
    tv = 0.5 * (a.softmax(-1) - b.softmax(-1)).abs().sum(-1)
    assert torch.allclose(TASKS['classification'].diagnosis.delta(a, b), tv)
    assert TASKS['regression'].diagnosis.delta(a, b).tolist() == [3.] == TASKS['embedding'].diagnosis.delta(a, b).tolist()
    y = torch.tensor([0, 1, 1])
    assert TASKS['classification'].diagnosis.aux_gain(torch.tensor([[9., 0], [0, 9], [9, 0]]), y).round(decimals=3).tolist() == [1., 0., -1.]
    assert TASKS['embedding'].diagnosis.aux_gain is None


def test_ratio_interval_is_the_bootstrap_of_the_ratio():
    "ratio_interval is bootstrap_ci of mean(num)/mean(den): the same resamples as drawing them all at once"
    from mmfusion.diagnosis import ratio_interval
    rng = np.random.default_rng(0); num, den = rng.normal(1, 1, 40), rng.normal(2, .5, 40)
    idx = np.random.default_rng(3).integers(0, 40, (500, 40))
    lo, hi = np.percentile(num[idx].mean(1) / den[idx].mean(1), [2.5, 97.5])
    assert ratio_interval(num, den, 500, seed=3) == pytest.approx((num.mean() / den.mean(), lo, hi))
    assert np.isnan(ratio_interval(num, np.zeros(40))[1])  # no denominator: no interval


def test_anomaly_checks_are_registered_and_need_no_output_score(tiny_batches):
    "A scorer is diagnosed by registered checks; none of them scores outputs (the autoencoder has no classifier output to score)"
    from mmfusion.diagnosis import ANOMALY_CHECKS
    from mmfusion.evaluation import ConvAutoencoder, Predictions
    ae = ConvAutoencoder(); ae.threshold = {'method': 'percentile', 'threshold': float('nan')}
    p = Predictions(np.array([0] * 6 + [1] * 6), np.r_[np.ones(6), 3 * np.ones(6)] + np.arange(12) * .01, [str(i) for i in range(12)])
    d = diagnose(ae, tiny_batches, ANOMALY_CHECKS[:3], scores=p, split='valid', checkpoint='best.pt', config={'data': {'valid': 'valid'}})
    assert [(f.check, f.severity) for f in d.findings] == [('score_separation', 'ok'), ('threshold', 'problem'), ('finite_inputs', 'ok')]
    assert 'best.pt holds no finite anomaly threshold' in d.findings[1].summary
    ae.threshold = {'method': 'percentile', 'threshold': 2.}
    ok = diagnose(ae, tiny_batches, ['threshold'], scores=p, split='valid', checkpoint='best.pt', config={'data': {'valid': 'valid'}}).findings
    assert ok[0].severity == 'ok' and ok[0].evidence['fitted_on_this_split'] and '6 of 6 anomalous' in ok[0].summary


def test_diagnose_run_dispatches_on_the_declared_kind(tmp_path):
    "diagnose_run asks the run's declared kind for its verb; a kind nobody registered is a KindError that says how to load every kind"
    from mmfusion.config import KindError, kind_verb
    from mmfusion.diagnosis import diagnose_anomaly_run, diagnose_fused_run
    assert kind_verb('fused', 'diagnose') is diagnose_fused_run and kind_verb('anomaly', 'diagnose') is diagnose_anomaly_run
    (tmp_path/'config.yaml').write_text('kind: no_such_kind\n')
    with pytest.raises(KindError, match="unknown kind of run 'no_such_kind'.*import mmfusion.runs"): diagnose_run(tmp_path)
