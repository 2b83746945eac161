"""The committed sample data is what the generator writes, and its READMEs state what benchmarks/ceilings.py measured.

- Committed data = generator: `make_sample_data` into a temp folder must reproduce every file under data/ byte for byte
  (PNG, JPEG, MP4, WAV, CSV, TXT: the encoders are deterministic with the pinned opencv/PyAV; checked by regenerating
  twice), except each README's ceilings section, which `benchmarks/ceilings.py` writes from its JSON (checked below).
- README ceilings = benchmarks/results/ceilings.json, rendered by the script's own `render`.
- The claims the READMEs make hold in that JSON: night needs thermal and NVG together, weld video is at chance, ...
- The JSON is what the script computes on the committed data (night and inspection recomputed here; weld and solar take
  minutes and are recomputed by running the script).
About a minute on 2 CPU cores."""
import hashlib
import pandas as pd, importlib.util, json, shutil
from pathlib import Path

import pytest
from mmfusion.sample_data import README_CEILINGS_MARK, SAMPLE_DATASETS, SEGMENTATION_CEILINGS_MARK, SEGMENTATION_SETS, make_sample_data

ROOT = Path(__file__).resolve().parents[1]
DATA, JSON = ROOT/'data', ROOT/'benchmarks'/'results'/'ceilings.json'


def load_ceilings_script():
    spec = importlib.util.spec_from_file_location('ceilings_script', ROOT/'benchmarks'/'ceilings.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def digest(root:Path) -> dict:
    "relative path -> sha256 of the file's bytes (a README without its computed ceilings section) for every sample dataset"
    out = {}
    for name in (*SAMPLE_DATASETS, *SEGMENTATION_SETS.values()):
        for f in sorted((root/name).rglob('*')):
            if not f.is_file(): continue
            data = f.read_bytes()
            if f.name == 'README.md':
                mark = SEGMENTATION_CEILINGS_MARK if name in SEGMENTATION_SETS.values() else README_CEILINGS_MARK
                data = data[:data.index(mark.encode())]
            out[f.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def differences(a:dict, b:dict) -> list:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


@pytest.fixture(scope='module')
def fresh(tmp_path_factory):
    "The sample data as the generator writes it now"
    root = tmp_path_factory.mktemp('fresh')
    make_sample_data(root)
    return root


@pytest.fixture(scope='module')
def ceilings():
    return json.loads(JSON.read_text())


def test_committed_data_matches_generator(fresh):
    diff = differences(digest(fresh), digest(DATA))
    assert not diff, (f"{len(diff)} file(s) under data/ differ from a fresh `make_sample_data` (regenerate with "
                      f"`mmfusion data generate --root data`, then `python benchmarks/ceilings.py`): {diff[:10]}")


def test_digest_catches_a_hand_edit_and_a_generator_change(fresh, tmp_path):
    copy = tmp_path/'data'
    shutil.copytree(fresh, copy)
    label = sorted((copy/'night/test/labels').glob('*.txt'))[0]
    label.write_text(label.read_text() + '0 0.5 0.5 0.1 0.2\n')  # a box added by hand
    (copy/'weld/manifest.csv').unlink()  # a file the generator writes is gone
    assert differences(digest(fresh), digest(copy)) == sorted([label.relative_to(copy).as_posix(), 'weld/manifest.csv'])
    readme = copy/'inspection/README.md'
    readme.write_text(readme.read_text().replace('| crack |', '| cracked |'))  # the prose above the ceilings counts too
    assert 'inspection/README.md' in differences(digest(fresh), digest(copy))


def test_readme_ceilings_are_rendered_from_the_json(ceilings):
    script = load_ceilings_script()
    assert set(ceilings) == set(SAMPLE_DATASETS)
    for name in SAMPLE_DATASETS:
        text = (DATA/name/'README.md').read_text()
        assert text.count(README_CEILINGS_MARK) == 1, name
        detection = json.loads(script.DETECTION.read_text()) if script.DETECTION.is_file() else None
        assert text.split(README_CEILINGS_MARK)[1].strip() == script.render(name, ceilings[name], detection).strip(), \
            f"data/{name}/README.md's ceilings differ from benchmarks/results/ceilings.json: run `python benchmarks/ceilings.py --readme-only`"


def score(entry, subset, key=None): return entry['subsets'][subset][key or entry['metric']]


def test_night_claim_each_stream_alone_is_ambiguous_and_thermal_plus_nvg_decide(ceilings):
    night = ceilings['night']
    for m in ('thermal', 'nvg', 'visual_enhanced'):
        assert score(night, m, 'oracle_balanced_accuracy') <= .8, m  # some look is shared by persons and decoys
        assert score(night, m) < score(night, 'thermal+nvg') - .15, m  # learned per-object classifiers agree
    assert score(night, 'thermal+nvg', 'oracle_balanced_accuracy') == 1.0
    assert score(night, 'thermal+nvg') >= .95
    assert score(night, 'visual_enhanced') <= night['chance_band']  # visible alone: lit persons = lit mannequins, the rest unseen
    assert night['n_test_objects'] >= 40


def test_night_claim_holds_for_trained_detectors():
    "benchmarks/night_detection.py: the fused detector clearly beats each trained single-modality detector on test mAP50-95"
    path = ROOT/'benchmarks'/'results'/'night_detection.json'
    if not path.is_file(): pytest.skip('benchmarks/night_detection.py has not been run')
    det = json.loads(path.read_text())
    assert det['data']['test_frames'] >= 30 and det['data']['test_decoys'] >= 10
    fused = det['fused']['test']['mAP50-95']
    for m, single in det['single'].items():
        assert fused >= single['best_phase_test']['mAP50-95'] + .05, m


def test_inspection_claim_fusion_beats_each_modality_and_nothing_is_saturated(ceilings):
    insp = ceilings['inspection']
    for m in ('image', 'metadata'):
        assert insp['chance_band'] < score(insp, m) < .9, m
        assert score(insp, 'all') > score(insp, m) + .1, m
    assert score(insp, 'all') < .95
    assert insp['cv'].endswith('grouped by battery')


def test_weld_claim_video_is_noise_and_the_rest_carry_the_classes(ceilings):
    weld = ceilings['weld']
    assert score(weld, 'video', 'balanced_accuracy') <= weld['chance_band']
    for m in ('images', 'audio', 'sensors'):
        assert score(weld, m, 'balanced_accuracy') > weld['chance_band'], m
        assert score(weld, 'images+audio+sensors') > score(weld, m) + .2, m


def test_solar_claim_magnetogram_is_noise_and_images_plus_wind_decide(ceilings):
    solar = ceilings['solar']
    assert score(solar, 'magnetogram') <= .1
    for m in ('193', '211', 'solar_wind'):
        assert score(solar, m) > .1, m
        assert score(solar, 'all') > score(solar, m) + .2, m


@pytest.mark.parametrize('name', ['night', 'inspection'])
def test_json_is_what_the_script_computes_on_the_committed_data(ceilings, name):
    fresh = getattr(load_ceilings_script(), name)(DATA/name)
    assert json.loads(json.dumps(fresh)) == ceilings[name]


def test_segmentation_set_is_digested_and_its_batteries_stay_in_one_split():
    "battery_seg is checked like the others (a hand-edited mask is a difference), and no battery spans two splits (the plan's leak)"
    files = digest(DATA)
    assert any(k.startswith('battery_seg/') and '/masks/' in k for k in files), sorted(files)[:5]
    meta = pd.read_csv(DATA/'battery_seg'/'metadata.csv')
    splits_per_battery = meta.groupby('battery_id')['split'].nunique()
    assert (splits_per_battery == 1).all(), splits_per_battery[splits_per_battery > 1]
    assert set(meta['split']) >= {'train', 'val', 'test'}


def test_segmentation_readme_ceilings_are_rendered_from_the_json():
    "data/battery_seg/README.md's computed section is what benchmarks/segmentation.py renders from its committed JSON"
    spec = importlib.util.spec_from_file_location('segmentation_bench', ROOT/'benchmarks'/'segmentation.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    result = json.loads((ROOT/'benchmarks'/'results'/'segmentation.json').read_text())
    readme = (DATA/'battery_seg'/'README.md').read_text()
    assert readme.split(SEGMENTATION_CEILINGS_MARK)[1].strip() == mod.render(result).strip()
