"`mmfusion diagnose` on short runs of every sample config (weld, inspection, solar, night detection); each report opened in headless Chromium"
import json, time
from pathlib import Path

import pytest

from browser import image_status, serve
from mmfusion.cli import main
from mmfusion.training import train

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
        return run_detection(ROOT/'configs/night_person.yaml', {'data': {'root': str(ROOT/'data/night'), 'imgsz': 64},
                             'baseline': {'epochs': 1}, 'training': {'epochs': 1}}, runs/name).dir
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
