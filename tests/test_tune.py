"mmfusion tune (Optuna): space errors, the refusal without a validation split, failing trials, resume after a kill, PostgreSQL with 2 workers, and `train --nproc`"
import json, os, pwd, shutil, signal, socket, subprocess, sys, tempfile, time
from pathlib import Path
import optuna, pandas as pd, pytest, torch, yaml
from optuna.trial import TrialState
from mmfusion.config import RunFolder
from mmfusion.training import load_checkpoint
from mmfusion.tune import SpaceError, prepare_search, tune

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT/'configs'/'smoke.yaml'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONHASHSEED': '0', 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg'}
TINY = {'training.epochs': 3, 'data.tiny.n': 24, 'data.batch_size': 12}  # 2 batches an epoch: a trial takes about a second
SPACE = {'params': {'training.lr': {'type': 'float', 'low': 3.0e-3, 'high': 3.0e-2, 'log': True},
                    'model.head.dropout': {'type': 'float', 'low': 0.0, 'high': 0.5}},
         'set': TINY, 'metric': 'valid_accuracy'}


def queued_study(tmp_path, direction:str, *trials:dict) -> Path:
    "A study folder whose journal already queues `trials` (params each), in order: tune runs them first"
    out = tmp_path/'study'
    out.mkdir()
    study = optuna.create_study(study_name='smoke', direction=direction,
                                storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out/'study.journal'))))
    for params in trials: study.enqueue_trial(params)
    return out


def space_file(tmp_path, space=SPACE, name='space.yaml') -> Path:
    p = tmp_path/name
    p.write_text(yaml.safe_dump(space, sort_keys=False))
    return p


# --- the space and the config are checked before any trial runs -------------------------------------------------------

BAD_SPACES = [
    ({'params': {'training.lrr': {'type': 'float', 'low': 0.1, 'high': 1.0}}}, "unknown key 'training.lrr'"),
    ({'params': {'model.encoders.video.name': {'choices': ['a']}}}, "unknown key 'model.encoders.video.name'"),
    ({'params': {'training.lr': {'type': 'float', 'low': 0.1, 'high': 0.01}}}, "'training.lr': empty range"),
    ({'params': {'training.epochs': {'type': 'int', 'low': 3, 'high': 3}}}, "'training.epochs': empty range"),
    ({'params': {'training.epochs': {'type': 'int', 'low': 1, 'high': 4.5}}}, "'training.epochs': wrong type"),
    ({'params': {'model.fusion.name': {'type': 'float', 'low': 0.1, 'high': 1.0}}}, "'model.fusion.name': wrong type"),
    ({'params': {'training.lr': {'type': 'float', 'low': 0.0, 'high': 1.0, 'log': True}}}, "'training.lr': log scale"),
    ({'params': {'training.lr': {'type': 'normal', 'low': 0.0, 'high': 1.0}}}, "'training.lr': type must be one of"),
    ({'params': {'training.lr': {'type': 'float', 'low': 0.0, 'high': 1.0, 'scale': 2}}}, "'training.lr': unknown field(s) ['scale']"),
    ({'params': {'model.fusion.name': {'choices': []}}}, "'model.fusion.name': categorical wants a non-empty list"),
    ({'params': {'training.lr': {'type': 'float', 'low': 0.001, 'high': 0.01, 'when': {'model.fusion.name': 'concat'}}}},
     "'training.lr': `when` names 'model.fusion.name', which is not a param listed before it"),
    ({'params': {'training.lr': {'type': 'float', 'low': 0.001, 'high': 0.01}}, 'sett': {}}, "unknown key(s) ['sett']"),
    ({'params': {'training.lr': {'type': 'float', 'low': 0.001, 'high': 0.01}}, 'metric': 'test_accuracy'}, "not a validation column"),
]

@pytest.mark.parametrize('space,msg', BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_a_bad_space_is_refused_naming_the_key(tmp_path, space, msg):
    f = space_file(tmp_path, space)
    with pytest.raises(SpaceError) as e: prepare_search(SMOKE, f)
    assert msg in str(e.value) and str(f) in str(e.value)


def test_a_config_without_validation_split_is_refused_with_the_fix(tmp_path):
    from mmfusion.cli import main
    f = space_file(tmp_path, {**SPACE, 'set': {**TINY, 'data.valid': None}})
    with pytest.raises(SystemExit) as e: main(['tune', str(SMOKE), '--space', str(f), '--out', str(tmp_path/'study')])
    msg = str(e.value.code)
    assert msg.startswith('mmfusion tune: ValueError:') and 'no validation split' in msg and 'data.split_off' in msg and 'group' in msg
    assert not (tmp_path/'study').exists()  # nothing ran
    # the fix it names works: a validation split held out of train
    fixed = {**SPACE, 'set': {**TINY, 'data.valid': 'val', 'data.split_off': {'val': {'from': 'train', 'fraction': 0.25}}}}
    assert prepare_search(SMOKE, fixed).valid == 'val'


# --- trials ----------------------------------------------------------------------------------------------------------

def test_failing_trials_are_recorded_with_their_reason_and_the_study_goes_on(tmp_path):
    space = {'params': {'training.lr': {'type': 'float', 'low': 1.0e-3, 'high': 1.0e+30, 'log': True},
                        'model.fusion.name': {'choices': ['concat', 'no_such_fusion']}}, 'set': TINY, 'metric': 'valid_accuracy'}
    out = queued_study(tmp_path, 'maximize', {'training.lr': 1.0e+30, 'model.fusion.name': 'concat'},  # a NaN loss
                       {'training.lr': 1.0e-2, 'model.fusion.name': 'no_such_fusion'})  # an error building the model
    res = tune(SMOKE, space, trials=3, out=out, verbose=False)  # then the config's own values (queued by tune)
    t = res.table.set_index('trial')
    assert t['state'].tolist() == ['fail', 'fail', 'complete']
    assert t.loc[0, 'reason'].startswith('NonFiniteLossError: loss is')
    assert 'no_such_fusion' in t.loc[1, 'reason'] and t.loc[1, 'reason'].startswith('KeyError')
    assert res.summary['best']['trial'] == 2 and res.summary['default']['trial'] == 2
    assert json.loads(RunFolder(t.loc[0, 'run_dir']).path.joinpath('metrics.json').read_text())['status'] == 'failed'
    md = (out/'trials.md').read_text()
    assert 'NonFiniteLossError' in md and 'no_such_fusion' in md
    for f in ('trials.csv', 'best.yaml', 'summary.json', 'plots/history.png'): assert (out/f).is_file(), f


def test_random_sampling_tries_the_same_values_whatever_the_pruner_did(tmp_path):
    "tune_bench's controlled comparison of pruning: with --sampler random, a pruned study tries the unpruned one's values trial by trial"
    from mmfusion.cli import main
    f = space_file(tmp_path)
    unpruned = tune(SMOKE, f, trials=12, out=tmp_path/'none', pruner='none', sampler='random', verbose=False)
    main(['tune', str(SMOKE), '--space', str(f), '--trials', '12', '--out', str(tmp_path/'hb'), '--pruner', 'hyperband', '--sampler', 'random', '--quiet'])
    pruned = pd.read_csv(tmp_path/'hb'/'trials.csv')
    assert (pruned.state == 'pruned').any()  # the pruner did act
    cols = ['training.lr', 'model.head.dropout']  # TPE would differ after its random start-up trials: it learns from the pruned values
    pd.testing.assert_frame_equal(pruned[cols], unpruned.table[cols].reset_index(drop=True), check_exact=False, rtol=1e-9)
    with pytest.raises(ValueError, match=r"sampler must be one of \['tpe', 'random'\], got 'grid'"): tune(SMOKE, f, trials=1, out=tmp_path/'x', sampler='grid')


def test_the_objective_is_the_validation_metric_and_best_yaml_is_the_users_config_with_the_best_values(tmp_path):
    res = tune(SMOKE, SPACE, trials=3, out=tmp_path/'study', pruner='none', verbose=False)
    for row in res.table.itertuples():
        run = RunFolder(row.run_dir)
        assert run.metrics['split'] == 'valid'  # no trial scored the test split
        assert run.history['valid_accuracy'].max() == pytest.approx(row.valid_accuracy)
    best = yaml.safe_load((tmp_path/'study'/'best.yaml').read_text())
    assert best['training']['lr'] == pytest.approx(res.summary['best']['params']['training.lr'])
    assert best['evaluation']['split'] == 'test' and best['training']['epochs'] == 3  # the user's config (+ set), not the trial's quiet settings
    other = {**SPACE, 'params': {**SPACE['params'], 'training.lr': {'type': 'float', 'low': 1.0e-3, 'high': 3.0e-2, 'log': True}}}
    with pytest.raises(ValueError, match='was started with another config, space or metric'):  # resuming mixes no other search in
        tune(SMOKE, other, trials=4, out=tmp_path/'study', verbose=False)


# --- resume after a kill ---------------------------------------------------------------------------------------------

def _trials(out):
    return optuna.load_study(study_name='smoke', storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out/'study.journal')))).get_trials()

def test_a_killed_study_resumes_where_it_stopped(tmp_path):
    out, f = tmp_path/'study', space_file(tmp_path, {**SPACE, 'set': {**TINY, 'training.epochs': 6}})
    code = "import sys; from mmfusion.cli import main; main(sys.argv[1:])"
    p = subprocess.Popen([sys.executable, '-c', code, 'tune', str(SMOKE), '--space', str(f), '--trials', '3', '--out', str(out), '--pruner', 'none'],
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # kill it in the middle of its second trial
            ts = _trials(out) if (out/'study.journal').exists() else []
            if len(ts) >= 2 and ts[0].state == TrialState.COMPLETE and ts[1].state == TrialState.RUNNING and 'worker' in ts[1].user_attrs: break
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.2)
        else: pytest.fail('the study never reached its second trial')
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None: p.kill()
    first = _trials(out)[0]
    mtime = (Path(first.user_attrs['run_dir'])/'metrics.json').stat().st_mtime
    res = tune(SMOKE, f, trials=3, out=out, pruner='none', verbose=False)
    t = res.table.set_index('trial')
    assert t.loc[1, 'state'] == 'fail' and 'was killed' in t.loc[1, 'reason']
    retry = [tr for tr in res.study.trials if tr.user_attrs.get('retry_of') == 1]
    assert len(retry) == 1 and retry[0].params == res.study.trials[1].params and retry[0].state == TrialState.COMPLETE
    assert (t['state'] == 'complete').sum() == 3 and len(t) == 4  # 3 trials in the budget; the killed one was retried, not counted
    assert (Path(first.user_attrs['run_dir'])/'metrics.json').stat().st_mtime == mtime  # trial 0 was not run again


# --- PostgreSQL with 2 workers ---------------------------------------------------------------------------------------

def _pg_bin():
    found = sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb'))
    if not found and os.geteuid() == 0 and shutil.which('apt-get'):  # a clean CI machine: Debian's server
        env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
        subprocess.run(['apt-get', 'update', '-qq'], env=env, capture_output=True, timeout=300)
        subprocess.run(['apt-get', 'install', '-y', '-qq', 'postgresql'], env=env, capture_output=True, timeout=600)
        found = sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb'))
    return found[-1].parent if found else None

@pytest.fixture
def postgres():
    "A private PostgreSQL server on a loopback port (initdb into a temp folder), run as the `postgres` user when we are root"
    bin_dir = _pg_bin()
    if bin_dir is None: pytest.skip("PostgreSQL server is not installed and cannot be installed here (needs Debian's `postgresql` package: apt-get, as root)")
    as_user = []
    d = Path(tempfile.mkdtemp(prefix='mmfusion-pg-'))
    if os.geteuid() == 0:
        try: pwd.getpwnam('postgres')
        except KeyError: pytest.skip("running as root and there is no `postgres` user to run the server as")
        shutil.chown(d, 'postgres'); as_user = ['runuser', '-u', 'postgres', '--']
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    data = d/'data'
    subprocess.run([*as_user, str(bin_dir/'initdb'), '-D', str(data), '-U', 'postgres', '--auth=trust', '-E', 'UTF8'], check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir/'pg_ctl'), '-D', str(data), '-l', str(d/'log'), '-w', '-o', f"-p {port} -k {d} -c listen_addresses=127.0.0.1", 'start'],
                   check=True, capture_output=True)
    try: yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir/'pg_ctl'), '-D', str(data), '-m', 'immediate', 'stop'], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)

def _ran_exactly(res, trials, n):
    "The study ran exactly n trials: n in the table, n run folders, and any trial beyond them skipped before it ran"
    ran = [t for t in trials if 'skipped' not in t.user_attrs]
    assert len(ran) == n and all(t.state.is_finished() for t in trials)
    assert all(t.state == TrialState.FAIL and 'run_dir' not in t.user_attrs for t in trials if 'skipped' in t.user_attrs)
    assert len(res.table) == n and sorted(p.name for p in (res.dir/'trials').iterdir()) == sorted(Path(t.user_attrs['run_dir']).name for t in ran)
    assert sum(res.summary['trials'].values()) == n and sum(json.loads((res.dir/'summary.json').read_text())['trials'].values()) == n
    return ran

def test_two_workers_share_a_study_on_postgresql(tmp_path, postgres):
    space = {**SPACE, 'set': {**TINY, 'training.epochs': 2}}  # trials far shorter than the second worker's start (importing torch)
    res = tune(SMOKE, space, trials=4, workers=2, storage=postgres, out=tmp_path/'study', study_name='pg', pruner='none', verbose=False)
    trials = optuna.load_study(study_name='pg', storage=postgres).get_trials()  # the study lives in the server
    ran = _ran_exactly(res, trials, 4)
    assert len({t.user_attrs['worker'] for t in ran}) == 2  # both ran trials: worker 0 kept one for the worker still starting
    assert res.summary['storage'].startswith('postgresql+psycopg2://postgres@127.0.0.1:')


def test_two_workers_on_the_journal_file_run_exactly_the_budget(tmp_path):
    space = {**SPACE, 'set': {**TINY, 'training.epochs': 2}}
    res = tune(SMOKE, space, trials=5, workers=2, out=tmp_path/'study', pruner='none', verbose=False)
    ran = _ran_exactly(res, _trials(tmp_path/'study'), 5)
    assert len({t.user_attrs['worker'] for t in ran}) == 2  # the second worker ran trials too, however fast the first was


def test_worker_0_waits_rather_than_take_a_trial_kept_for_a_starting_worker(tmp_path):
    "With one trial kept, run_worker runs until one is left, waits while it is kept, and takes it once nothing is kept"
    from mmfusion.tune import counted, open_storage, run_worker
    out = tmp_path/'study'
    tune(SMOKE, SPACE, trials=1, out=out, pruner='none', verbose=False)  # the study, with trial 0 done
    study = optuna.load_study(study_name='smoke', storage=open_storage(None, out))
    seen = []
    def reserve():  # one trial kept for the first 4 looks, as for a worker that starts late
        seen.append(len(counted(study.get_trials(deepcopy=False))))
        return 1 if len(seen) <= 4 else 0
    s = prepare_search(SMOKE, SPACE)
    job = {'config': s.config, 'space': s.space.spec(), 'study': 'smoke', 'storage': None, 'dir': str(out), 'trials': 3,
           'timeout': None, 'pruner': 'none', 'sampler': 'tpe', 'seed': 0}
    assert run_worker(job, 0, reserve=reserve) == 2
    assert seen == [1, 2, 2, 2, 2, 3]  # ran trial 1, waited 3 looks with the last trial kept, then ran it


def test_a_trial_started_beyond_the_budget_runs_nothing(tmp_path):
    "Two workers both saw room for the last trial: the one that started second is skipped, trains nothing and is not counted"
    from mmfusion.tune import objective, open_storage
    out = tmp_path/'study'
    res = tune(SMOKE, SPACE, trials=2, out=out, pruner='none', verbose=False)
    study = optuna.load_study(study_name='smoke', storage=open_storage(None, out))
    late = study.ask()  # as the other worker's trial, started once the budget was full
    with pytest.raises(RuntimeError, match='over the budget of 2 trials'): objective(late, prepare_search(SMOKE, SPACE), out, budget=2)
    study.tell(late, state=TrialState.FAIL)
    assert not (out/'trials'/f'trial-{late.number:03d}').exists()
    again = tune(SMOKE, SPACE, trials=2, out=out, pruner='none', verbose=False)  # resuming: the budget is full, nothing runs
    assert len(again.table) == 2 and again.table['run_dir'].tolist() == res.table['run_dir'].tolist()


# --- pruning ---------------------------------------------------------------------------------------------------------

def test_the_median_pruner_stops_a_planted_bad_region_and_never_a_good_trial(tmp_path):
    "A learning rate of 1e-6 leaves the validation loss where it starts; 1e-2 lowers it every epoch: the bad trials are pruned early"
    good, bad, epochs = 1.0e-2, 1.0e-6, 6
    space = {'params': {'training.lr': {'choices': [good, bad]}}, 'set': {**TINY, 'training.epochs': epochs}, 'metric': 'valid_loss'}
    plan = [good, good, good, bad, good, bad, bad]  # 3 complete trials before the median pruner judges (its startup)
    out = queued_study(tmp_path, 'minimize', *({'training.lr': lr} for lr in plan))
    res = tune(SMOKE, space, trials=len(plan), out=out, pruner='median', baseline=False, verbose=False)
    t = res.table.set_index('trial')
    assert t['training.lr'].tolist() == plan
    is_bad = t['training.lr'] == bad
    assert (t.loc[is_bad, 'state'] == 'pruned').all() and (t.loc[~is_bad, 'state'] == 'complete').all()
    assert (t.loc[is_bad, 'epochs'] < epochs).all() and (t.loc[~is_bad, 'epochs'] == epochs).all()
    for n in t.index[is_bad]:  # pruned on the values it reported, epoch by epoch, after the warmup
        tr = res.study.trials[n]
        assert sorted(tr.intermediate_values) == list(range(1, t.loc[n, 'epochs'] + 1)) and t.loc[n, 'reason'].startswith('pruned after epoch')
        assert RunFolder(t.loc[n, 'run_dir']).history['valid_loss'].tolist() == pytest.approx([tr.intermediate_values[s] for s in sorted(tr.intermediate_values)])
    assert res.summary['best']['params'] == {'training.lr': good}


# --- mmfusion train --nproc 2 ----------------------------------------------------------------------------------------

DDP_MODEL = [  # as tests/test_training.py: no BatchNorm, no dropout, SGD: the 2 ranks compute exactly the single-process update
    'data.modalities=[series, tabular]', 'data.batch_size=12',
    'model.encoders={series: {name: series_transformer, in_channels: 4, dim: 8, heads: 2, depth: 1, dropout: 0.0},'
    ' tabular: {name: tabular_mlp, n_numeric: 4, cardinalities: [3, 2], dim: 8, hidden: 16, dropout: 0.0}}',
    'model.fusion={name: concat, dim: 16}', 'model.head={name: classification, n_classes: 3}',
    'model.aux_heads={modalities: [series, tabular], weight: 0.3}', 'training.epochs=3', 'training.optimizer=sgd', 'training.lr=0.05',
    'training.tensorboard=false']

@pytest.mark.slow  # 4 Python processes (torchrun, 2 ranks, 1 single): ~30 s of CPU
def test_train_nproc_2_matches_one_process(tmp_path):
    code = "import sys; from mmfusion.cli import main; main(sys.argv[1:])"
    for name, extra in (('ddp', ['--nproc', '2']), ('single', [])):
        sets = [f'--set={o}' for o in DDP_MODEL + [f'runs_dir={tmp_path}', f'name={name}']]
        r = subprocess.run([sys.executable, '-c', code, 'train', str(SMOKE), '--quiet', *sets, *extra], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    ddp, one = (load_checkpoint(tmp_path/n/'checkpoints'/'last.pt') for n in ('ddp', 'single'))
    assert ddp['step'] == one['step'] == 12  # every global batch was split across the 2 ranks
    for k, v in one['state_dict'].items():
        if v.is_floating_point(): torch.testing.assert_close(ddp['state_dict'][k], v, atol=1e-5, rtol=1e-4)
    for r_ddp, r_one in zip(ddp['history'], one['history']):
        assert r_ddp['valid_loss'] == pytest.approx(r_one['valid_loss'], abs=1e-5)


@pytest.mark.parametrize('config,space,valid,metric', [('weld.yaml', 'weld_space.yaml', 'val', 'valid_accuracy'),
                                                       ('night_person.yaml', 'night_space.yaml', 'val', 'valid_mAP50-95')])
def test_the_shipped_spaces_check_against_their_configs(config, space, valid, metric):
    s = prepare_search(ROOT/'configs'/config, ROOT/'configs'/space)
    assert (s.valid, s.metric, s.direction) == (valid, metric, 'maximize')


def test_each_kind_names_its_validation_split_and_segmentation_is_tunable():
    "tune asks the kind (its `valid_split` verb, registered in the kind's own notebook): segmentation validates on data.valid"
    space = {'params': {'training.lr': {'type': 'float', 'low': 1.0e-3, 'high': 1.0e-2, 'log': True}}}
    s = prepare_search(ROOT/'configs'/'inspection_segmentation.yaml', space)
    assert (s.kind, s.valid, s.metric, s.direction) == ('segmentation', 'val', 'valid_miou', 'maximize')
    with pytest.raises(ValueError, match='no validation split'):
        prepare_search(ROOT/'configs'/'inspection_segmentation.yaml', {**space, 'set': {'data.valid': None}})


def test_a_tiny_segmentation_search_runs_on_validation_and_reports_the_fused_phase(tmp_path):
    "Two trials over the lr of the battery segmenter, shrunk (1 baseline epoch, 2 fused): each scored on 'val', epoch by epoch"
    space = {'params': {'training.lr': {'type': 'float', 'low': 1.0e-3, 'high': 1.0e-2, 'log': True}},
             'set': {'baseline.epochs': 1, 'baseline.modalities': ['ct'], 'training.epochs': 2, 'model.aspp_channels': 16,
                     'evaluation.n_boot': 50, 'diagnosis.n_boot': 50, 'data.batch_size': 8}}
    res = tune(ROOT/'configs'/'inspection_segmentation.yaml', space, trials=2, out=tmp_path/'study', pruner='none',
               overrides=[f'runs_dir={tmp_path}', f"data.root={ROOT/'data'}"], verbose=False)
    assert res.table['state'].tolist() == ['complete', 'complete'] and res.summary['validation_split'] == 'val'
    for row, t in zip(res.table.itertuples(), res.study.trials):
        run = RunFolder(row.run_dir)
        assert run.metrics['split'] == 'val'  # scored on validation, never test
        fused = pd.DataFrame(run.metrics['history'])['valid_miou'].tolist()
        assert [t.intermediate_values[s] for s in sorted(t.intermediate_values)] == pytest.approx(fused)  # the fused phase's epochs only
        assert max(fused) == pytest.approx(row.valid_miou)


def test_compare_to_default_retrains_both_on_new_seeds_and_finds_a_planted_gain(tmp_path):
    "The config's own lr (1e-6) leaves the validation loss where it starts; the search's best (1e-2) lowers it on every new seed"
    good, bad = 1.0e-2, 1.0e-6
    space = {'params': {'training.lr': {'choices': [good, bad]}}, 'set': {**TINY, 'training.epochs': 4, 'training.lr': bad}, 'metric': 'valid_loss'}
    out = queued_study(tmp_path, 'minimize', {'training.lr': good})
    res = tune(SMOKE, space, trials=2, out=out, pruner='none', verbose=False, compare_seeds=3)  # trial 1: the config's own values
    assert res.table['default'].tolist() == [False, True] and res.summary['best']['params'] == {'training.lr': good}
    cmp = json.loads((out/'summary.json').read_text())['comparison']
    assert cmp['seeds'] == [1, 2, 3] and cmp['metric'] == 'valid_loss'  # seeds other than the config's (0), on which the trials ran
    for r in cmp['runs']:
        for name, lr in (('best', good), ('default', bad)):
            run = RunFolder(out/'compare'/f"{name}-seed{r['seed']}")
            assert run.config['seed'] == r['seed'] and run.config['training']['lr'] == lr and run.metrics['split'] == 'valid'
            assert run.history['valid_loss'].min() == pytest.approx(r[name])
    assert all(r['best'] < r['default'] for r in cmp['runs'])
    assert cmp['difference']['mean'] == pytest.approx(sum(r['default'] - r['best'] for r in cmp['runs']) / 3)  # a loss: lower is better
    assert cmp['difference']['low'] > 0 and cmp['verdict'] == 'better'


@pytest.mark.parametrize('own,other,hint', [(1.0e-6, 1.0e-2, True), (1.0e-2, 1.0e-6, False)], ids=['search-wins', 'own-wins'])
def test_a_best_trial_beating_trial_0_is_flagged_as_no_evidence_unless_re_trained(tmp_path, capsys, own, other, hint):
    "The best of all trials can only be at least trial 0's: when it is another trial, the summary says so and names --compare-seeds"
    space = {'params': {'training.lr': {'choices': [own, other]}}, 'set': {**TINY, 'training.epochs': 4, 'training.lr': own}, 'metric': 'valid_loss'}
    out = queued_study(tmp_path, 'minimize', {'training.lr': other})
    res = tune(SMOKE, space, trials=2, out=out, pruner='none', bar=False)  # trial 0: the other lr; trial 1: the config's own
    assert res.table['default'].tolist() == [False, True]
    assert (res.summary['best']['params'] == {'training.lr': other}) == hint  # 1e-2 lowers the loss, 1e-6 leaves it where it starts
    assert ('no evidence' in capsys.readouterr().out) == hint
