"""Every CLI verb on a short run of every kind (fused, anomaly, detection): it works, or it refuses with the reason.

The kinds' capabilities are read from `mmfusion.runs.capabilities()`, so a verb a kind registers later is tested the
day it is registered, and a refusal must name why (the registered reason reaches the user's terminal)."""
import json, os, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MMFUSION = [sys.executable, '-c', 'from mmfusion.cli import main; main()']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg', 'PYTHONHASHSEED': '0', 'HF_HUB_OFFLINE': '1'}
QUICK = ['training.progress=false', 'training.tensorboard=false']
CONFIGS = {  # kind -> (config, overrides for a short run)
    'fused': ('configs/inspection.yaml', ['data.root=data', 'training.epochs=1', 'training.stages=null', *QUICK]),
    'anomaly': ('configs/inspection_anomaly.yaml', ['data.root=data', 'training.epochs=1', *QUICK]),
    'detection': ('configs/night_person.yaml', ['data.root=data', 'gate=null', 'data.imgsz=64', 'baseline.epochs=1', 'baseline.modalities=[thermal]',
                                                'training.epochs=1', 'training.stages=null', *QUICK]),
}
INPUTS = {'fused': ['--input', 'image=data/inspection/images'], 'anomaly': ['--input', 'image=data/inspection/anomaly/test/defect'],
          'detection': ['--thermal', 'data/night/test/thermal', '--nvg', 'data/night/test/nvg', '--visual', 'data/night/test/visual_enhanced']}


def cli(*args, ok=True):
    r = subprocess.run([*MMFUSION, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=900)
    if ok: assert r.returncode == 0, f"mmfusion {' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope='module')
def capabilities():
    from mmfusion.runs import capabilities
    return capabilities()


def test_every_shipped_kind_does_every_verb(capabilities):
    "Issue 14: every command works on every kind that exists today (every verb of RUN_VERBS); a refusal registered later would fail here, not pass quietly"
    from mmfusion.config import RUN_VERBS
    table = capabilities.loc[['fused', 'anomaly', 'detection', 'segmentation'], list(RUN_VERBS)]
    assert (table == 'yes').all().all(), table.to_string()


def test_an_option_a_kind_does_not_take_is_a_clear_error(tmp_path):
    "--force is the detector's Phase-1 gate override: on a fused config it is refused by name, before anything trains"
    r = cli('train', 'configs/smoke.yaml', '--set', f'runs_dir={tmp_path}', '--force', ok=False)
    assert r.returncode != 0 and "fused runs do not take ['force'] for train" in r.stderr, r.stderr[-1500:]
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope='module', params=list(CONFIGS))
def run(request, tmp_path_factory):
    "A short run of each kind, trained through `mmfusion train`"
    kind = request.param
    config, overrides = CONFIGS[kind]
    runs = tmp_path_factory.mktemp(f'{kind}_runs')
    out = cli('train', config, '--set', f'runs_dir={runs}', *sum((['--set', o] for o in overrides), []))
    folder = Path(out.stdout.strip().splitlines()[-1].split('run folder: ')[-1])
    assert folder.is_dir() and (folder/'config.yaml').is_file(), out.stdout[-2000:]
    return kind, folder


def expect(capabilities, kind, verb, r, check):
    "A registered verb must succeed and pass `check`; a refused one must fail with its reason on stderr"
    how = capabilities.loc[kind, verb]
    if how == 'yes':
        assert r.returncode == 0, f"{kind} {verb} failed:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
        check()
    else:
        assert r.returncode != 0 and f"{kind} runs cannot" in r.stderr and how[:40] in r.stderr.replace('\n', ' '), (kind, verb, r.stderr[-2000:])


def test_train_declares_the_kind(run):
    kind, folder = run
    from mmfusion.config import RunFolder
    assert RunFolder(folder).kind == kind and f"kind: {kind}" in (folder/'config.yaml').read_text()


def test_evaluate(run, capabilities):
    kind, folder = run
    r = cli('evaluate', folder, '--out', folder/'eval_cli', ok=False)
    expect(capabilities, kind, 'evaluate', r, lambda: (folder/'eval_cli'/'metrics.json').is_file() or pytest.fail(r.stdout))


def test_diagnose(run, capabilities):
    kind, folder = run
    r = cli('diagnose', folder, '--out', folder/'diag_cli', ok=False)
    expect(capabilities, kind, 'diagnose', r, lambda: (folder/'diag_cli'/'findings.json').is_file() or pytest.fail(r.stdout))


def test_predict(run, capabilities):
    kind, folder = run
    r = cli('predict', folder, *INPUTS[kind], '--out', folder/'pred_cli', '--data-root', 'data', ok=False)
    def check():
        records = json.loads((folder/'pred_cli'/'predictions.json').read_text())
        assert records and all('id' in x for x in records), records[:2]
        assert len({x['id'] for x in records}) == len(records)  # one record per sample, paired by file name
    expect(capabilities, kind, 'predict', r, check)


def test_export(run, capabilities):
    kind, folder = run
    r = cli('export', folder, '--out', folder/'export_cli', '--format', 'onnx', '--format', 'torchscript', '--data-root', 'data', ok=False)
    def check():
        files = sorted(p.suffix for p in (folder/'export_cli').iterdir() if p.suffix in ('.onnx', '.pt'))
        assert files == ['.onnx', '.pt'], list((folder/'export_cli').iterdir())  # both formats, neither overwriting the other's card
        assert r.stdout.count('max abs difference from PyTorch') == 2, r.stdout
    expect(capabilities, kind, 'export', r, check)


def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_serve(run, capabilities):
    "`mmfusion serve` answers /health for a kind with a predictor, and refuses (exit != 0, the reason) for one without"
    kind, folder = run
    port = free_port()
    proc = subprocess.Popen([*MMFUSION, 'serve', str(folder), '--port', str(port), '--data-root', 'data'], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    health = None
    try:
        for _ in range(600):
            if proc.poll() is not None: break
            try: health = json.load(urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=1)); break
            except OSError: time.sleep(0.2)
    finally:
        if proc.poll() is None: proc.terminate()
        _, err = proc.communicate(timeout=30)
    if capabilities.loc[kind, 'predictor'] == 'yes': assert health and health['status'] == 'ok', err[-2000:]
    else: assert health is None and proc.returncode != 0 and f"{kind} runs cannot be served" in err, err[-2000:]


def test_kinds_table_lists_every_kind_and_verb():
    "`mmfusion kinds` prints the registry: a row per registered kind, a column per verb, 'yes' in every cell of the shipped kinds"
    from mmfusion.config import RUN_KINDS, RUN_VERBS
    from mmfusion.runs import load_kinds
    header, *rows = cli('kinds').stdout.strip().splitlines()
    assert header.split() == list(RUN_VERBS), header
    table = {r.split()[0]: r.split()[1:] for r in rows}
    assert set(table) == set(load_kinds()) and {'anomaly', 'detection', 'fused'} <= set(table), rows
    assert all(table[k] == ['yes'] * len(RUN_VERBS) for k in RUN_KINDS.names), rows


def test_every_verb_refuses_a_kind_nothing_registered(tmp_path):
    "A run folder of an unknown kind: every verb exits non-zero naming the kind and the kinds that exist (nothing runs)"
    folder = tmp_path/'odd'
    folder.mkdir(); (folder/'config.yaml').write_text('kind: no_such_kind\n')
    for verb, extra in [('evaluate', []), ('diagnose', []), ('predict', ['--input', 'image=x.png']), ('export', []), ('serve', ['--port', '1'])]:
        r = cli(verb, folder, *extra, ok=False)
        assert r.returncode != 0 and "unknown kind of run 'no_such_kind'" in r.stderr and "'fused'" in r.stderr, (verb, r.stderr[-1500:])
