"""Bad-input corpus: one case per kind of bad input, each must raise a DataError naming the offending file or CSV row;
the same faults together in `on_error='skip'` mode must yield a report listing exactly the bad samples."""
import shutil
from pathlib import Path

import cv2, numpy as np, pandas as pd, pytest
from mmfusion.data import DataError, manifest_dataset, paired_folders, sequence_dataset, split_file_datasets, weld_modalities
from mmfusion.sample_data import (make_inspection_data, make_night_data, make_solar_data, make_weld_data, INSPECTION_METADATA,
                                  INSPECTION_CLASSES)


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


# --- non-finite numbers: one positive (raises, naming file and line/row) and one negative (loads) case per reader ---------
from mmfusion.data import check_splits, from_arrays, read_csv_numeric, read_series, read_voc_labels, read_yolo_labels
from mmfusion.sample_data import INSPECTION_GROUP
import math, random, torch

NON_FINITE = ['nan', 'NaN', '-nan', 'inf', '-inf', '+Infinity', '1e999']

VOC = """<annotation><size><width>{W}</width><height>{H}</height></size>
<object><name>person</name><bndbox><xmin>{x0}</xmin><ymin>10</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>"""


@pytest.mark.parametrize('value', NON_FINITE)
@pytest.mark.parametrize('field', [0, 1, 2, 3, 4])
def test_yolo_label_non_finite_field_names_file_and_line(tmp_path, field, value):
    f = tmp_path/'frame.txt'
    cells = ['0', '0.5', '0.5', '0.2', '0.4']; cells[field] = value
    f.write_text('0 0.5 0.5 0.1 0.1\n' + ' '.join(cells) + '\n')
    with pytest.raises(DataError, match=f'{f} line 2'): read_yolo_labels(f, 1)


def test_yolo_label_finite_fields_load(tmp_path):
    f = tmp_path/'frame.txt'; f.write_text('0 0.5 0.5 0.1 0.1\n0 1e-3 0.5 2e-3 0.4\n')
    out = read_yolo_labels(f, 1)
    assert out['boxes'].shape == (2, 4) and torch.isfinite(out['boxes']).all()


@pytest.mark.parametrize('key,value', [(k, v) for k in ('W', 'H') for v in ('nan', 'inf', '0')] + [('x0', 'nan'), ('x0', '-inf')])
def test_voc_label_non_finite_or_zero_size_names_file(tmp_path, key, value):
    f = tmp_path/'frame.xml'
    vals = dict(W='64', H='48', x0='10'); vals[key] = value
    f.write_text(VOC.format(**vals))
    with pytest.raises(DataError, match=str(f)): read_voc_labels(f, ['person'])


def test_voc_label_finite_loads(tmp_path):
    f = tmp_path/'frame.xml'; f.write_text(VOC.format(W='64', H='48', x0='10'))
    assert torch.isfinite(read_voc_labels(f, ['person'])['boxes']).all()


@pytest.mark.parametrize('value', NON_FINITE)
def test_series_csv_non_finite_names_file_and_row(tmp_path, value):
    f = tmp_path/'sensors.csv'; f.write_text(f"time,current\n0,1\n1,{value}\n2,3\n")
    with pytest.raises(DataError, match=f'{f} row 3'): read_series(f)
    with pytest.raises(DataError, match=f'{f} row 3'): read_csv_numeric(f)


def test_series_csv_finite_loads(tmp_path):
    f = tmp_path/'sensors.csv'; f.write_text("time,current\n0,1\n1,-2.5e3\n2,3\n")
    assert torch.isfinite(read_series(f)).all()


def _metadata_cell(root, column, value):
    sid = Path((root/'inspection/train.txt').read_text().splitlines()[0].split('\t')[0]).stem
    path = root/'inspection/metadata.csv'; df = pd.read_csv(path, dtype=str, keep_default_na=False)
    i = df.index[df.sample_id == sid][0]; df.loc[i, column] = value; df.to_csv(path, index=False)
    return f"{path} row {i + 2}"


@pytest.mark.parametrize('column', ['capacity_mah', 'weight_g', 'supplier', 'line', INSPECTION_GROUP])
@pytest.mark.parametrize('value', ['nan', '-inf'])
def test_metadata_table_non_finite_names_file_and_row(corpus, column, value):
    where = _metadata_cell(corpus, column, value)
    with pytest.raises(DataError, match=where):
        split_file_datasets(corpus/'inspection', **INSPECTION_METADATA, group_column=INSPECTION_GROUP, class_names=INSPECTION_CLASSES)


def test_metadata_table_finite_loads(corpus):
    _metadata_cell(corpus, 'supplier', 'Nanotech')  # a category that merely starts like 'nan'
    splits = split_file_datasets(corpus/'inspection', **INSPECTION_METADATA, group_column=INSPECTION_GROUP, class_names=INSPECTION_CLASSES)
    assert all(torch.isfinite(s.inputs['metadata']).all() for ds in splits.values() for s in read_all(ds))


@pytest.mark.parametrize('value', ['inf', 'nan'])
def test_targets_csv_non_finite_names_file_and_row(corpus, value):
    path = corpus/'solar/train/targets.csv'; df = pd.read_csv(path, dtype=str)
    df.loc[1, 'kp'] = value; df.to_csv(path, index=False)
    with pytest.raises(DataError, match=f'{path} row 3'): solar(corpus)


def test_targets_csv_finite_loads(corpus):
    assert all(torch.isfinite(s.target).all() for s in read_all(solar(corpus)))


# --- group-aware split hygiene --------------------------------------------------------------------------------------------
def test_inspection_cells_carry_their_battery_and_the_committed_splits_keep_batteries_whole(corpus):
    splits = split_file_datasets(corpus/'inspection', **INSPECTION_METADATA, group_column=INSPECTION_GROUP, class_names=INSPECTION_CLASSES)
    meta = pd.read_csv(corpus/'inspection/metadata.csv').set_index('sample_id')
    for ds in splits.values():
        assert ds.groups == meta.loc[[r.id for r in ds.records], INSPECTION_GROUP].tolist()
    report = check_splits(splits, content=False)
    assert report.ok and report.shared_groups == {}


def test_check_splits_reports_a_battery_split_across_train_and_test(corpus):
    path = corpus/'inspection/metadata.csv'; df = pd.read_csv(path, dtype=str)
    test_id = Path((corpus/'inspection/test.txt').read_text().splitlines()[0].split('\t')[0]).stem
    train_battery = df.set_index('sample_id').loc[Path((corpus/'inspection/train.txt').read_text().splitlines()[0].split('\t')[0]).stem, INSPECTION_GROUP]
    df.loc[df.sample_id == test_id, INSPECTION_GROUP] = train_battery; df.to_csv(path, index=False)  # a test cell joins a train battery
    report = check_splits(split_file_datasets(corpus/'inspection', **INSPECTION_METADATA, group_column=INSPECTION_GROUP,
                                              class_names=INSPECTION_CLASSES), content=False)
    assert not report.ok and report.shared_groups == {train_battery: ['test', 'train']}
    assert train_battery in repr(report)


def test_groups_from_arrays_and_without_groups():
    x = np.zeros((4, 2), 'f4')
    assert from_arrays({'x': x}, [0, 1, 0, 1], groups=['a', 'a', 'b', 'b']).groups == ['a', 'a', 'b', 'b']
    assert from_arrays({'x': x}, [0, 1, 0, 1]).groups == [None]*4  # no groups: nothing to report
    assert check_splits({'train': from_arrays({'x': x}, [0, 1, 0, 1]), 'test': from_arrays({'x': x + 1}, [0, 1, 0, 1], ids=list('abcd'))}).ok
    with pytest.raises(DataError, match='3 groups for 4 rows'): from_arrays({'x': x}, [0, 1, 0, 1], groups=['a', 'b', 'c'])


# --- fuzz: random garbage in label and CSV files raises a DataError naming a file, or loads finite data ---------------------
TOKENS = ['0', '1', '-1', '0.5', '1e-3', '2', '3.62', '1e308', '1e400', 'nan', 'NaN', 'inf', '-inf', '+Infinity', '', ' ',
          '0x1A', '1,5', '١', '½', '∞', 'None', 'null', 'n/a', '"', "'", 'normal', 'L1', 'A', 'images/cell_0001.png',
          '../x', 'TRAIN', 'TEST', 'Good', 'sample_0001', 'é', '\x00', '\ufeff', 'a' * 300]
SEPARATORS = {'yolo': ' ', 'csv': ',', 'split': '\t'}


def token(rng:random.Random) -> str:
    "A garbage cell; half of the time a non-finite number, the case that slips past range checks"
    return rng.choice(NON_FINITE if rng.random() < .5 else TOKENS)


def garbage(rng:random.Random, valid:str, sep:str) -> bytes:
    "One of: random bytes, a token soup, or the valid file with a few cells, lines or bytes changed"
    kind = rng.randrange(4)
    if kind == 0: return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if kind == 1:
        return '\n'.join(sep.join(token(rng) for _ in range(rng.randrange(0, 8))) for _ in range(rng.randrange(0, 6))).encode()
    lines = valid.splitlines()
    for _ in range(rng.randrange(1, 4)):
        if not lines: break
        i = rng.randrange(len(lines)); cells = lines[i].split(sep)
        op = rng.randrange(5)
        if op == 0: cells[rng.randrange(len(cells))] = token(rng)
        elif op == 1: del cells[rng.randrange(len(cells))]
        elif op == 2: cells.insert(rng.randrange(len(cells) + 1), token(rng))
        elif op == 3: lines.insert(i, lines[i])
        else: lines[i] = lines[i][:rng.randrange(len(lines[i]) + 1)]
        if op < 3: lines[i] = sep.join(cells)
    data = '\n'.join(lines).encode()
    if kind == 3 and data:
        b = bytearray(data); b[rng.randrange(len(b))] = rng.randrange(256); data = bytes(b)
    return data


def finite(x) -> bool:
    if isinstance(x, torch.Tensor): return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, dict): return all(finite(v) for v in x.values())
    if isinstance(x, (list, tuple)): return all(finite(v) for v in x)
    if isinstance(x, float): return math.isfinite(x)
    return True


def load_everything(splits) -> list:
    return [(s.inputs, s.target) for ds in (splits.values() if isinstance(splits, dict) else [splits]) for s in read_all(ds)]


FUZZ_TARGETS = {  # name -> (file inside the corpus, separator, loader of everything that reads it, files it may point at)
    'yolo_label': ('night/train/labels/frame_0001.txt', 'yolo', lambda r: read_yolo_labels(r/'night/train/labels/frame_0001.txt', 1), False),
    'night_split': ('night/train/labels/frame_0002.txt', 'yolo', lambda r: load_everything(night(r)), False),
    'sensor_csv': (None, 'csv', None, False),  # a weld sample's sensors.csv, read with read_series
    'metadata_csv': ('inspection/metadata.csv', 'csv', lambda r: load_everything(split_file_datasets(
        r/'inspection', **INSPECTION_METADATA, group_column=INSPECTION_GROUP, class_names=INSPECTION_CLASSES)), False),
    'split_file': ('inspection/train.txt', 'split', lambda r: load_everything(split_file_datasets(
        r/'inspection', **INSPECTION_METADATA, group_column=INSPECTION_GROUP, class_names=INSPECTION_CLASSES)), True),
    'manifest_csv': ('weld/manifest.csv', 'csv', lambda r: load_everything(weld(r, split='TEST')), True),
    'targets_csv': ('solar/train/targets.csv', 'csv', lambda r: load_everything(solar(r)), True),
    'wind_csv': ('solar/train/sample_0001/wind.csv', 'csv', lambda r: read_series(r/'solar/train/sample_0001/wind.csv'), False),
}


def test_fuzz_label_and_csv_files(corpus):
    "~200 seeded garbage files: each load raises a DataError naming the file (or, for files listing others, a file under the root) or yields finite data"
    sensors = corpus/'weld'/weld_train_sample(corpus, 0)/'sensors.csv'
    targets = {**FUZZ_TARGETS, 'sensor_csv': (sensors.relative_to(corpus).as_posix(), 'csv', lambda r: read_series(sensors), False)}
    rng, outcomes = random.Random(13), {'DataError': 0, 'loaded': 0}
    originals = {name: (corpus/rel).read_bytes() for name, (rel, *_) in targets.items()}
    for case in range(200):
        name = list(targets)[case % len(targets)]
        rel, sep, load, lists_files = targets[name]
        path = corpus/rel
        path.write_bytes(garbage(rng, originals[name].decode(), SEPARATORS[sep]))
        try:
            out = load(corpus)
        except DataError as e:
            named = str(path) in str(e) or (lists_files and str(corpus) in str(e))
            assert named, f"case {case} ({name}): {e!r} does not name {path}; input {path.read_bytes()[:200]!r}"
            outcomes['DataError'] += 1
        except Exception as e:
            raise AssertionError(f"case {case} ({name}): {type(e).__name__}: {e}; input {path.read_bytes()[:200]!r}") from e
        else:
            assert finite(out), f"case {case} ({name}) loaded non-finite data from {path.read_bytes()[:200]!r}"
            outcomes['loaded'] += 1
        finally:
            path.write_bytes(originals[name])
    assert outcomes['DataError'] > 50 and outcomes['loaded'] > 5, outcomes  # the fuzz reaches both outcomes


def test_manifest_non_finite_split_names_file_and_row(corpus):
    _, where = _edit_manifest(corpus, 2, 'SPLIT', 'nan')  # the row would silently belong to no split
    with pytest.raises(DataError, match=where): weld(corpus)


def test_manifest_text_cells_load(corpus):
    _edit_manifest(corpus, 2, 'SPLIT', ' train ')  # spacing and case are tolerated
    assert len(weld(corpus)) == len(weld_rows(corpus).query("SPLIT.str.strip().str.upper() == 'TRAIN'"))


# --- dataset methods: selection refuses unknown names; caching reads each file once; subsets keep what the split carries ----
from mmfusion.data import Modality, MultiModalDataset, Record


def counted_dataset(n=4, reads=None):
    "A dataset whose reader counts every read of each source"
    def reader(v): reads[v[0]] = reads.get(v[0], 0) + 1; return torch.tensor(v)
    return MultiModalDataset([Record(f's{i}', {'x': [float(i), 1.], 'y': [float(i)]}, i % 2) for i in range(n)],
                             [Modality('x', reader), Modality('y', torch.tensor)], 'classification', ['a', 'b'], name='counted')


def test_select_unknown_modality_names_the_dataset_and_changes_nothing(corpus):
    ds = inspection(corpus)
    with pytest.raises(KeyError, match=r"inspection/train.txt has no modality \['audio'\]; it has \['image', 'metadata'\]"):
        ds.select(['image', 'audio'])
    assert list(ds.modalities) == ['image', 'metadata'] and set(ds[0].inputs) == {'image', 'metadata'}
    with pytest.raises(ValueError, match='at least one modality'): ds.select([])


def test_select_reads_only_the_kept_modalities_in_their_order(corpus):
    ds = inspection(corpus).select(['metadata'])
    assert set(ds[0].inputs) == {'metadata'} and ds.shapes() == {'metadata': (5,)}
    b = next(iter(ds.loader(batch_size=2)))
    assert b['modalities'] == ['metadata'] and list(b['inputs']) == ['metadata']


def test_cache_reads_each_sample_once_and_select_drops_cached_modalities():
    reads = {}
    ds = counted_dataset(reads=reads).cache()
    for _ in range(3): [ds[i] for i in range(len(ds))]
    assert ds.cached and reads == {0.: 1, 1.: 1, 2.: 1, 3.: 1}
    ds[-1]; assert reads[3.] == 1  # -1 is the last sample, not a new cache entry
    assert set(ds.select(['y'])[0].inputs) == {'y'}  # a cached sample read before the selection does not leak 'x'
    uncached_reads = {}
    plain = counted_dataset(reads=uncached_reads)
    for _ in range(3): [plain[i] for i in range(len(plain))]
    assert not plain.cached and set(uncached_reads.values()) == {3}


def test_subset_keeps_settings_tabular_and_caching(corpus):
    train = inspection(corpus).cache()
    part = train.subset([2, 0], 'part')
    assert [r.id for r in part.records] == [train.records[2].id, train.records[0].id]
    assert (part.name, part.task, part.class_names, part.cached) == ('part', train.task, train.class_names, True)
    assert part.tabular is train.tabular is not None
    assert torch.equal(part[1].inputs['metadata'], train[0].inputs['metadata'])
    assert not counted_dataset(reads={}).subset([0]).cached
