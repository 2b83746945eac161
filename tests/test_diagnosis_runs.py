"`mmfusion diagnose` on short runs of every sample config (weld, inspection, solar, night detection); each report opened in headless Chromium"
import json, time
from pathlib import Path

import pytest

from browser import image_status, serve
from mmfusion.cli import main
from mmfusion.kinds import train

ROOT = Path(__file__).resolve().parent.parent
SHORT = {  # a few epochs each: enough for a real run folder, not a good model
    'weld': ['training.epochs=1'],
    'inspection': ['training.epochs=2', 'training.early_stopping=null'],
    'solar': ['training.stages.0.epochs=2', 'training.stages.1.epochs=1', 'training.curriculum.lengths={0: 4, 1: 12}'],
}


def make_run(name:str, runs:Path) -> Path:
    "A short run of configs/NAME.yaml under `runs`; its folder"
    if name == 'night_person':
        from mmfusion.detection import run_detection
        return run_detection(ROOT/'configs/night_person.yaml', {'data': {'imgsz': 64},  # the config's own data (run from the repo root); a one-epoch Phase 1
                             'baseline': {'epochs': 1}, 'training': {'epochs': 1}, 'gate': None}, runs/name).dir   # cannot pass the gate
    return train(ROOT/f'configs/{name}.yaml', [f'runs_dir={runs}', f'data.root={ROOT/"data"}', 'training.progress=false',
                                               'training.tensorboard=false', *SHORT[name]], verbose=False).dir


@pytest.fixture(scope='module', params=['weld', 'inspection', 'solar', 'night_person'])
def diagnosed(request, tmp_path_factory):
    "(scenario, run folder, findings.json, seconds) after `mmfusion diagnose RUN_DIR`"
    t = time.perf_counter()
    run = make_run(request.param, tmp_path_factory.mktemp(request.param))
    main(['diagnose', str(run)])
    return request.param, run, json.loads((run/'diagnosis'/'findings.json').read_text()), time.perf_counter() - t


def test_report_renders_in_chromium(diagnosed, browser):
    "report.html opens without console errors, shows every finding's heading and summary, and every figure decodes"
    name, run, found, _ = diagnosed
    assert found['findings'] and sum(found['counts'].values()) == len(found['findings'])
    with serve(run/'diagnosis') as url:
        text, errors = browser.open(url + '/report.html', f'diagnosis_{name}.png')
        images = image_status(browser, url + '/report.html')
    assert errors == []
    for f in found['findings']:
        assert f"[{f['severity']}] {f['check']}" in text and f['summary'] in text, f['summary']
    pngs = sorted(p.stem for p in (run/'diagnosis').glob('*.png'))
    assert pngs and sorted(alt for alt, _ in images) == pngs
    assert all(ok for _, ok in images), images


def test_checks_fit_the_scenario(diagnosed):
    "Each scenario gets its own checks: temporal checks only where time is real, the detection check on the detector"
    name, run, found, seconds = diagnosed
    checks = {(f['check'], f['subject']) for f in found['findings']}
    if name == 'night_person':
        assert {f['check'] for f in found['findings']} == {'detection', 'finite_inputs', 'split_leakage', 'lr_schedule'}
        assert {s for c, s in checks if c == 'detection'} == {'thermal', 'nvg', 'visual_enhanced', None}
        table = next(f for f in found['findings'] if f['check'] == 'detection')['evidence']['table']
        assert 'thermal only (baseline)' in table  # the Phase-1 model of the run folder is the single-modality reference
    else: assert ('modality_contribution', None) not in checks and any(c == 'modality_contribution' for c, _ in checks)
    if name == 'weld':  # five camera angles are a set of views, not a time axis; the video is a sequence
        assert ('temporal', 'images') not in checks and ('temporal', 'video') in checks
    if name == 'solar':  # the image sequence is a time axis: the temporal checks look at it
        assert ('temporal', 'frames') in checks
    print(f"{name}: {found['counts']} in {seconds:.0f}s")


# --- the weld run's verdicts against planted truth (data/weld/README.md) and against its own ablation (eval/metrics.json)
WELD_EPOCHS = 40  # what `make demo` trains (configs/weld.yaml)


@pytest.fixture(scope='module')
def weld_checked(tmp_path_factory):
    "(findings by check, metrics.json) of a weld run trained WELD_EPOCHS epochs, evaluated, then diagnosed"
    from mmfusion.diagnosis import diagnose_run
    from mmfusion.evaluation import evaluate_run
    run = train(ROOT/'configs/weld.yaml', [f'runs_dir={tmp_path_factory.mktemp("weld_verdicts")}', f'data.root={ROOT/"data"}', 'training.progress=false',
                                           'training.tensorboard=false', f'training.epochs={WELD_EPOCHS}'], verbose=False).dir
    evaluate_run(run, progress=False, n_boot=100)
    d = diagnose_run(run)
    found = {}
    for f in d.findings: found.setdefault(f.check, {})[f.subject] = f
    return found, json.loads((run/'eval'/'metrics.json').read_text())


def test_weld_ablation_shows_the_planted_roles(weld_checked):
    "The premise: removing images or sensors costs the run, removing the video (noise by construction) does not"
    _, rec = weld_checked
    change = {r['setting']: r['change'] for r in rec['metrics']['ablation']}
    assert change['without images'] < -0.1 and change['without sensors'] < -0.1, change
    assert abs(change['without video']) < 0.05, change


def test_weld_verdicts_match_the_data(weld_checked):
    "The weld video carries no class information: found unused; images and sensors decide most classes: found contributing"
    found, _ = weld_checked
    contrib = found['modality_contribution']
    verdicts = {m: f.evidence['verdict'] for m, f in contrib.items()}
    print(verdicts, {m: (round(f.evidence['shapley_share'], 3), [round(x, 3) for x in f.evidence['share_ci']]) for m, f in contrib.items()})
    assert verdicts['video'] in ('ignored', 'uninformative'), verdicts
    assert verdicts['images'] == 'contributes' and verdicts['sensors'] == 'contributes', verdicts
    for f in contrib.values():  # the run is judged by k-NN on the embedding head: so is the diagnosis, and it says so
        assert f.evidence['head'] == 'embedding' and 'k-NN (k=5, cosine)' in f.evidence['score'] and 'training split' in f.evidence['score']
        assert f.evidence['split'] == 'test'  # weld has no validation split


def test_weld_diagnosis_agrees_with_its_ablation(weld_checked):
    "No finding contradicts eval/metrics.json's ablation: one ablation_agreement finding per modality, all ok"
    found, rec = weld_checked
    agree = found['ablation_agreement']
    assert set(agree) == set(found['modality_contribution']) == {'video', 'images', 'audio', 'sensors'}
    assert all(f.severity == 'ok' for f in agree.values()), [f.summary for f in agree.values()]
    assert {f.evidence['ablation_split'] for f in agree.values()} == {rec['metrics']['split']}


def test_the_requested_split_is_the_one_diagnosed(diagnosed):
    "`mmfusion diagnose --split test` diagnoses test, detection runs included; by default a run with a validation split is diagnosed on it"
    name, run, found, _ = diagnosed
    main(['diagnose', str(run), '--split', 'test', '--out', str(run/'diagnosis_test')])
    title = json.loads((run/'diagnosis_test'/'findings.json').read_text())['title']
    assert '(test split' in title, title
    assert ('(test split' in found['title']) == (name == 'weld'), found['title']  # weld ships no validation split
