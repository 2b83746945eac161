"""The command line end to end on the smoke config: train -> evaluate -> diagnose, each writing what it promises."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MMFUSION = [sys.executable, '-c', 'from mmfusion.cli import main; main()']


def mmfusion(*args, cwd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    r = subprocess.run([*MMFUSION, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"mmfusion {' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def finite_numbers(obj):
    if isinstance(obj, dict): return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list): return all(finite_numbers(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp('runs')
    mmfusion('train', ROOT/'configs/smoke.yaml', '--set', f'runs_dir={runs}', '--set', 'training.progress=false', '--quiet', cwd=ROOT)
    return runs/'smoke'


def test_train_writes_the_run_folder(run_dir):
    for f in ('config.yaml', 'metrics.json', 'history.csv', 'checkpoints/last.pt'): assert (run_dir/f).is_file(), f
    m = json.loads((run_dir/'metrics.json').read_text())
    assert m['primary']['value'] > m['primary']['baseline']  # the smoke model beats the majority class


def test_evaluate_writes_consistent_metrics(run_dir):
    out = mmfusion('evaluate', run_dir, '--checkpoint', 'last', cwd=ROOT)
    assert '95% CI' in out
    rec = json.loads((run_dir/'eval/metrics.json').read_text())
    assert finite_numbers(rec)
    assert sum(map(sum, rec['metrics']['confusion'])) == rec['split_sizes']['test']
    assert (run_dir/'eval/summary.md').is_file() and any((run_dir/'eval').glob('*.png'))


def test_diagnose_writes_the_report(run_dir):
    mmfusion('diagnose', run_dir, cwd=ROOT)
    findings = json.loads((run_dir/'diagnosis/findings.json').read_text())
    assert findings and all(f['severity'] in ('ok', 'warning', 'problem') for f in (findings['findings'] if isinstance(findings, dict) else findings))
    html = (run_dir/'diagnosis/report.html').read_text()
    assert '<img' in html and 'data:image/png;base64,' in html


def test_bad_run_dir_is_a_clear_error(tmp_path):
    r = subprocess.run([*MMFUSION, 'evaluate', str(tmp_path/'nowhere')], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and 'not a run folder' in r.stderr


def test_export_refuses_variable_length_inputs_by_name(run_dir):
    "The smoke data's series vary in length (padded + masked in batches): export says so instead of freezing one length"
    r = subprocess.run([*MMFUSION, 'export', str(run_dir), '--format', 'onnx'], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode != 0 and "['series'] have variable length" in r.stderr, r.stderr[-2000:]
    assert not (run_dir/'export').exists()


def test_demo_verdicts_agree_with_its_ablation(tmp_path):
    "`make demo` (weld): the diagnosis finds the video (noise by construction) unused, images and sensors contributing, and no verdict its own ablation contradicts"
    out = mmfusion('demo', '--root', ROOT/'data', '--out', tmp_path/'demo', '--scenario', 'weld', cwd=ROOT)
    found = json.loads((tmp_path/'demo'/'weld'/'diagnosis'/'findings.json').read_text())['findings']
    verdicts = {f['subject']: f['evidence']['verdict'] for f in found if f['check'] == 'modality_contribution'}
    assert verdicts['video'] in ('ignored', 'uninformative') and verdicts['images'] == verdicts['sensors'] == 'contributes', verdicts
    agreement = [f for f in found if f['check'] == 'ablation_agreement']
    assert len(agreement) == 4 and all(f['severity'] == 'ok' for f in agreement), [f['summary'] for f in agreement]
    assert '[problem] ablation_agreement' not in out and 'video' in out  # what the demo prints says the same
