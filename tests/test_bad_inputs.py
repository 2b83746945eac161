"""Bad-input corpus: one case per kind of bad input, each must raise a DataError naming the offending file or CSV row;
the same faults together in `on_error='skip'` mode must yield a report listing exactly the bad samples."""
import shutil
from pathlib import Path

import cv2, numpy as np, pandas as pd, pytest
from mmfusion.data import (DataError, make_inspection_data, make_night_data, make_solar_data, make_weld_data, manifest_dataset,
                           paired_folders, sequence_dataset, split_file_datasets, weld_modalities, INSPECTION_METADATA, INSPECTION_CLASSES)


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp('pristine')
    make_night_data(root/'night', n_frames=14, size=(64, 48), seed=1)
    make_weld_data(root/'weld', n_per_class=(1, 1), seed=1)
    make_inspection_data(root/'inspection', n_per_class=(2, 1, 1), seed=1)
    make_solar_data(root/'solar', n_samples=(5, 1, 1), steps=4, size=16, seed=1)
    return root


@pytest.fixture
def corpus(pristine, tmp_path):
    "A fresh copy of the pristine corpus for one test to break"
    shutil.copytree(pristine, tmp_path/'c')
    return tmp_path/'c'


def read_all(ds): return [ds[i] for i in range(len(ds))]

# --- loaders, one per layout -------------------------------------------------------------------------------------------
def night(root, on_error='raise'): return paired_folders(root/'night', 'train', on_error=on_error)
def weld(root, on_error='raise', split='TRAIN'): return manifest_dataset(root/'weld', split, modalities=weld_modalities(n_mels=16), on_error=on_error)
def inspection(root, on_error='raise'): return split_file_datasets(root/'inspection', **INSPECTION_METADATA, class_names=INSPECTION_CLASSES, on_error=on_error)['train']
def solar(root, on_error='raise'): return sequence_dataset(root/'solar', 'train', on_error=on_error)

# --- faults: each breaks one sample and returns (sample id, text the error must contain) ----------------------------------
def first(folder, pattern='*'): return sorted(Path(folder).glob(pattern))[0]

def night_missing_modality(root, k=0):
    f = sorted((root/'night/train/nvg').iterdir())[k]; f.unlink()
    return f.stem, f"nvg/{f.stem}.*"

def night_corrupt_image(root, k=1):
    f = sorted((root/'night/train/thermal').iterdir())[k]; f.write_bytes(b'\x89PNG\r\n garbage')
    return f.stem, str(f)

def night_box_outside(root, k=2):
    f = sorted((root/'night/train/labels').iterdir())[k]; f.write_text("0 0.97 0.5 0.2 0.3\n")
    return f.stem, f"{f} line 1"

def night_zero_box(root, k=3):
    f = sorted((root/'night/train/labels').iterdir())[k]; f.write_text("0 0.5 0.5 0.0 0.3\n")
    return f.stem, f"{f} line 1"

def night_unknown_class(root, k=4):
    f = sorted((root/'night/train/labels').iterdir())[k]; f.write_text("3 0.5 0.5 0.1 0.3\n")
    return f.stem, f"{f} line 1"

def night_size_mismatch(root, k=5):
    f = sorted((root/'night/train/nvg').iterdir())[k]; cv2.imwrite(str(f), np.zeros((40, 50), np.uint8))
    return f.stem, str(f)

def weld_rows(root):
    return pd.read_csv(root/'weld/manifest.csv', dtype=str)

def weld_train_sample(root, k):
    df = weld_rows(root)
    return df[df.SPLIT == 'TRAIN'].SUBDIRS.iloc[k]

def weld_missing_required(root, k=0):
    sid = weld_train_sample(root, k); f = root/'weld'/sid/'sensors.csv'; f.unlink()
    return sid, str(f)

def weld_corrupt_audio(root, k=1):
    sid = weld_train_sample(root, k); f = root/'weld'/sid/'audio.wav'; f.write_bytes(b'RIFF....WAVEfmt garbage')
    return sid, str(f)

def weld_corrupt_video(root, k=None):
    df = weld_rows(root)
    sid = next(s for s in df[df.SPLIT == 'TRAIN'].SUBDIRS.iloc[2:] if (root/'weld'/s/'video.mp4').exists())
    f = root/'weld'/sid/'video.mp4'; f.write_bytes(b'\x00\x00\x00\x18ftypmp42 garbage' * 10)
    return sid, str(f)

def weld_nan_csv(root, k=3, value='n/a'):
    sid = weld_train_sample(root, k); f = root/'weld'/sid/'sensors.csv'
    lines = f.read_text().splitlines(); cells = lines[5].split(','); cells[2] = value; lines[5] = ','.join(cells)
    f.write_text('\n'.join(lines) + '\n')
    return sid, f"{f} row 6"

def weld_inf_csv(root, k=4): return weld_nan_csv(root, k, 'inf')

def _edit_manifest(root, k, column, value):
    path = root/'weld/manifest.csv'; df = weld_rows(root)
    i = df.index[df.SPLIT == 'TRAIN'][k]; sid = df.SUBDIRS[i]; df.loc[i, column] = value; df.to_csv(path, index=False)
    return (value if column == 'SUBDIRS' else sid), f"{path} row {i + 2}"

def weld_unknown_label(root, k=5): return _edit_manifest(root, k, 'CATEGORY', 'Crackz')
def weld_path_escape(root, k=6): return _edit_manifest(root, k, 'SUBDIRS', '../../etc')

def inspection_nan_metadata(root):
    sid = Path((root/'inspection/train.txt').read_text().splitlines()[0].split('\t')[0]).stem
    path = root/'inspection/metadata.csv'; df = pd.read_csv(path, dtype=str)
    i = df.index[df.sample_id == sid][0]; df.loc[i, 'voltage'] = 'nan'; df.to_csv(path, index=False)
    return sid, f"{path} row {i + 2}"

def _edit_split_line(root, k, new):
    path = root/'inspection/train.txt'; lines = path.read_text().splitlines()
    old_path = lines[k].split('\t')[0]; lines[k] = new(lines[k]); path.write_text('\n'.join(lines) + '\n')
    return old_path, f"{path} line {k + 1}"

def inspection_unknown_label(root):
    p, where = _edit_split_line(root, 1, lambda l: l.split('\t')[0] + '\tbogus')
    return Path(p).stem, where

def inspection_path_escape(root):
    _, where = _edit_split_line(root, 2, lambda l: '../../secret.png\tnormal')
    return 'secret', where

def inspection_missing_image(root):
    p = (root/'inspection/train.txt').read_text().splitlines()[3].split('\t')[0]
    (root/'inspection'/p).unlink()
    return Path(p).stem, str(root/'inspection'/p)

def solar_nonnumeric_series(root):
    f = root/'solar/train/sample_0001/wind.csv'; lines = f.read_text().splitlines()
    cells = lines[2].split(','); cells[1] = 'fast'; lines[2] = ','.join(cells); f.write_text('\n'.join(lines) + '\n')
    return 'sample_0001', f"{f} row 3"

def solar_missing_channel(root):
    d = root/'solar/train/sample_0002'; (d/'t01_211.png').unlink()
    return 'sample_0002', str(d)

def solar_nan_target(root):
    path = root/'solar/train/targets.csv'; df = pd.read_csv(path, dtype=str)
    i = df.index[df.sample_id == 'sample_0003'][0]; df.loc[i, 'kp'] = 'NaN'; df.to_csv(path, index=False)
    return 'sample_0003', f"{path} row {i + 2}"

CASES = {
    night: [night_missing_modality, night_corrupt_image, night_box_outside, night_zero_box, night_unknown_class, night_size_mismatch],
    weld: [weld_missing_required, weld_corrupt_audio, weld_corrupt_video, weld_nan_csv, weld_inf_csv, weld_unknown_label, weld_path_escape],
    inspection: [inspection_nan_metadata, inspection_unknown_label, inspection_path_escape, inspection_missing_image],
    solar: [solar_nonnumeric_series, solar_missing_channel, solar_nan_target],
}
PARAMS = [pytest.param(load, fault, id=fault.__name__) for load, faults in CASES.items() for fault in faults]


@pytest.mark.parametrize('load,fault', PARAMS)
def test_each_bad_input_names_where(corpus, load, fault):
    _, where = fault(corpus)
    with pytest.raises(DataError) as e: read_all(load(corpus))
    assert where in str(e.value), f"error {str(e.value)!r} does not name {where!r}"


@pytest.mark.parametrize('load', list(CASES), ids=lambda f: f.__name__)
def test_skip_mode_reports_exactly_the_bad_samples(corpus, load):
    clean = load(corpus)
    bad = {fault(corpus)[0] for fault in CASES[load]}
    ds = load(corpus, on_error='skip')
    assert {s.sample_id for s in ds.skipped} == bad
    assert len(ds) + len(bad) == len(clean)  # every other sample kept
    read_all(ds)  # what is left loads cleanly
    assert all(s.problem and s.source for s in ds.skipped)


@pytest.mark.parametrize('make_empty', ['weld', 'inspection', 'night'])
def test_empty_split_is_an_error(corpus, make_empty):
    if make_empty == 'weld':
        df = weld_rows(corpus); df[df.SPLIT == 'TRAIN'].to_csv(corpus/'weld/manifest.csv', index=False)
        with pytest.raises(DataError, match='split has no samples'): weld(corpus, split='TEST')
    elif make_empty == 'inspection':
        (corpus/'inspection/test.txt').write_text('')
        with pytest.raises(DataError, match=r'test\.txt: split has no samples'):
            split_file_datasets(corpus/'inspection', **INSPECTION_METADATA, class_names=INSPECTION_CLASSES)
    else:
        for d in (corpus/'night/val').iterdir(): shutil.rmtree(d); d.mkdir()
        with pytest.raises(DataError, match='split has no samples'): paired_folders(corpus/'night', 'val')
