"""Per-modality ceilings of the shipped sample sets: how well each modality alone, and all together, can do.

For every sample set, simple models are fitted on hand-crafted or downsampled features of one modality (or of several)
and scored by 5-fold cross-validation over all splits pooled (folds keep a group whole where the set has groups:
a night frame's objects, an inspection battery's cells). Two models per feature set, the better one is the ceiling:
scikit-learn's logistic regression (standardised features) and histogram gradient boosting (captures interactions such as
"hot in thermal AND grey in nvg"). The night set also gets an appearance oracle: from `mmfusion.sample_data.NIGHT_OBJECTS`, the
best rule that sees only what an object looks like in the given streams (majority label per look, learned on train
and val, scored on test). Every classification score comes with its chance level and a chance band (chance + 2 binomial standard
errors), so "at chance" is a statement the numbers can support.

  night       per-object person-vs-decoy balanced accuracy from each stream's crop around the object (objects.csv)
  inspection  5-class macro-F1 and balanced accuracy, CT slice (16x16 pixels + dark-pixel features) vs metadata vs both
  weld        12-class macro-F1 and balanced accuracy, video / images / audio / sensors / all
  solar       R^2 of kp, 193 / 211 / magnetogram image sequences (per-step brightness) / solar wind / all

Writes benchmarks/results/ceilings.json and replaces the ceilings section of every data/*/README.md (below
`mmfusion.sample_data.README_CEILINGS_MARK`) with a table rendered from that JSON (night: plus the trained single-modality and
fused detectors of benchmarks/results/night_detection.json, when present). About a minute on 2 CPU cores.
Run: .venv/bin/python benchmarks/ceilings.py [--root data] [--out benchmarks/results/ceilings.json] [--sets night ...]
     .venv/bin/python benchmarks/ceilings.py --readme-only   (after `mmfusion data generate`: rewrite the READMEs from the JSON)
"""
from __future__ import annotations
import argparse, json, math, warnings
from pathlib import Path

import cv2, numpy as np, pandas as pd
from mmfusion.core import write_text_atomic
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import balanced_accuracy_score, f1_score, r2_score
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmfusion.data import NIGHT_MODALITIES, WELD_CLASSES
from mmfusion.sample_data import INSPECTION_CLASSES, NIGHT_OBJECTS, README_CEILINGS_MARK, sample_splits

ROOT = Path(__file__).resolve().parents[1]
DETECTION = ROOT/'benchmarks'/'results'/'night_detection.json'  # trained detectors per modality (benchmarks/night_detection.py)
SEED = 0


def _models(task:str) -> dict:
    "The two simple models compared per feature set"
    if task == 'regression':
        return {'ridge': make_pipeline(SimpleImputer(), StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))),
                'gbm': HistGradientBoostingRegressor(max_iter=100, random_state=SEED)}
    return {'logreg': make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(C=.1, max_iter=3000)),
            'gbm': HistGradientBoostingClassifier(max_iter=100, random_state=SEED)}


def _cv_scores(X:np.ndarray, y:np.ndarray, task:str, groups=None) -> dict:
    "Cross-validated score of each model on features `X`: classification -> macro-F1 and balanced accuracy; regression -> R^2"
    if task == 'regression': cv = KFold(5, shuffle=True, random_state=SEED)
    elif groups is not None: cv = StratifiedGroupKFold(5, shuffle=True, random_state=SEED)
    else: cv = StratifiedKFold(5, shuffle=True, random_state=SEED)
    out = {}
    for name, model in _models(task).items():
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            p = cross_val_predict(model, X, y, cv=cv, groups=groups)
        out[name] = ({'r2': float(r2_score(y, p))} if task == 'regression' else
                     {'macro_f1': float(f1_score(y, p, average='macro')), 'balanced_accuracy': float(balanced_accuracy_score(y, p))})
    return out


def _subsets(features:dict, y, task:str, groups=None, combos:dict|None=None) -> dict:
    "Scores of every single modality, of the named combinations, and of all modalities together; 'ceiling' = the best model"
    sets = {m: [m] for m in features} | (combos or {}) | {'all': list(features)}  # single modalities first
    key = 'r2' if task == 'regression' else 'balanced_accuracy'
    out = {}
    for name, mods in sets.items():
        scores = _cv_scores(np.concatenate([features[m] for m in mods], 1), y, task, groups)
        best = max(scores, key=lambda k: scores[k][key])
        out[name] = {'modalities': mods, 'models': scores, 'best_model': best, **{k: v for k, v in scores[best].items()}}
    return out


def _chance(y) -> dict:
    "Chance balanced accuracy (1/K) and its band: chance + 2 binomial standard errors over n samples"
    k, n = len(set(y)), len(y)
    return {'chance': 1/k, 'chance_band': 1/k + 2*math.sqrt((1/k)*(1 - 1/k)/n)}


# ---------------------------------------------------------------- night: per-object crops
def _night_crop(img:np.ndarray, o, W:int, H:int) -> np.ndarray:
    "The object's box widened to a square-ish window (pane and bloom context), averaged to 4x6 cells"
    half = .5*o.h
    x0, x1 = int(max(0, o.x + o.w/2 - half)), int(min(W, o.x + o.w/2 + half))
    y0, y1 = int(max(0, o.y - .2*o.h)), int(min(H, o.y + 1.2*o.h))
    return cv2.resize(img[y0:y1, x0:x1].astype(np.float32), (4, 6), interpolation=cv2.INTER_AREA).reshape(-1)


def night(root:Path) -> dict:
    "Person-vs-decoy ceilings per object: appearance oracle (train -> test) and cross-validated crop classifiers"
    objs = pd.read_csv(root/'objects.csv')
    feats = {m: [] for m in NIGHT_MODALITIES}
    for (split, frame), rows in objs.groupby(['split', 'frame'], sort=False):
        for m in NIGHT_MODALITIES:
            f = next((root/split/m).glob(f'{frame}.*'))
            img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED).astype(np.float32)
            img = (img.mean(-1) if img.ndim == 3 else img)/(65535 if img.max() > 255 else 255)
            H, W = img.shape
            feats[m] += [(i, _night_crop(img, o, W, H)) for i, o in zip(rows.index, rows.itertuples())]
    X = {m: np.stack([f for _, f in sorted(v, key=lambda t: t[0])]) for m, v in feats.items()}
    y, groups = objs.person.to_numpy(), (objs.split + '/' + objs.frame).to_numpy()
    combos = {'thermal+nvg': ['thermal', 'nvg'], 'thermal+visual_enhanced': ['thermal', 'visual_enhanced'], 'nvg+visual_enhanced': ['nvg', 'visual_enhanced']}
    subsets = _subsets(X, y, 'classification', groups, combos)
    looks = {k: dict(zip(['person', *NIGHT_MODALITIES], v[1:])) for k, v in NIGHT_OBJECTS.items()}
    train, test = objs[objs.split != 'test'], objs[objs.split == 'test']
    for name, s in subsets.items():
        look = lambda kinds: kinds.map(lambda k: tuple(looks[k][m] for m in s['modalities']))
        rule = train.person.groupby(look(train.kind).to_numpy()).mean().round().astype(int)  # majority label per look
        pred = look(test.kind).map(lambda l: rule.get(l, 0))
        s['oracle_balanced_accuracy'] = float(balanced_accuracy_score(test.person, pred))
    return {'task': 'person vs decoy, per labelled person and decoy (objects.csv)', 'metric': 'balanced_accuracy',
            'n': len(y), 'n_test_objects': len(test), 'cv': '5-fold, grouped by frame', **_chance(y), 'subsets': subsets}


# ---------------------------------------------------------------- inspection: CT slice + metadata
def _ct_features(img:np.ndarray) -> np.ndarray:
    "16x16 pixels plus features of dark spots against the windings (cracks, voids) and of the core's offset (misalignment)"
    img = img.astype(np.float32)/255
    yy, xx = np.mgrid[:64, :64]
    smooth = cv2.GaussianBlur(img, (0, 0), .7)
    core = (smooth < .15) & (np.hypot(xx - 32, yy - 32) < 12)
    cy, cx = (yy[core].mean(), xx[core].mean()) if core.any() else (32., 32.)
    rc = np.hypot(xx - cx, yy - cy)
    ring = np.minimum(np.round(rc*4).astype(int), 4*40)  # quarter-pixel rings around the core: the windings' own profile
    profile = np.bincount(ring.ravel(), smooth.ravel())/np.maximum(np.bincount(ring.ravel()), 1)
    resid = np.where((rc > 5) & (np.hypot(xx - 32, yy - 32) < 24), smooth - profile[ring], 0)
    dark = resid < -.1
    n, _, stats, _ = cv2.connectedComponentsWithStats(dark.astype(np.uint8))
    big = stats[1:][np.argmax(stats[1:, cv2.CC_STAT_AREA])] if n > 1 else np.array([0, 0, 0, 0, 0])
    extent = max(big[cv2.CC_STAT_WIDTH], big[cv2.CC_STAT_HEIGHT])  # a crack is long and thin, a void round
    hand = [dark.sum(), big[cv2.CC_STAT_AREA], extent, extent**2/max(big[cv2.CC_STAT_AREA], 1), n, resid.min(),
            np.sort(resid.ravel())[:20].mean(), math.hypot(cx - 32, cy - 32)]
    return np.concatenate([cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA).reshape(-1), hand])


def inspection(root:Path) -> dict:
    "5-class ceilings of the CT slice alone, the metadata alone and both, cross-validated with batteries kept whole"
    rows = pd.concat([pd.read_csv(root/f'{s}.txt', sep='\t', names=['path', 'label']) for s in ('train', 'val', 'test')], ignore_index=True)
    meta = pd.read_csv(root/'metadata.csv').set_index('sample_id').loc[rows.path.str[len('images/'):-len('.png')]]
    X = {'image': np.stack([_ct_features(cv2.imread(str(root/p), cv2.IMREAD_GRAYSCALE)) for p in rows.path]),
         'metadata': pd.get_dummies(meta.drop(columns=['battery_id'], errors='ignore'), columns=['supplier', 'line']).to_numpy(np.float32)}
    y = rows.label.map(INSPECTION_CLASSES.index).to_numpy()
    groups = meta['battery_id'].to_numpy() if 'battery_id' in meta else None
    return {'task': f'{len(INSPECTION_CLASSES)}-class cell defect', 'metric': 'macro_f1', 'n': len(y),
            'cv': '5-fold' + (', grouped by battery' if groups is not None else ''), **_chance(y), 'subsets': _subsets(X, y, 'classification', groups)}


# ---------------------------------------------------------------- weld: video, images, audio, sensors
def weld(root:Path) -> dict:
    "12-class ceilings of each weld modality and all four, from downsampled frames/views, mel statistics and sensor statistics"
    samples = [s for ds in sample_splits('weld', root.parent).values() for s in ds]
    def feat(s, m):
        x = s.inputs.get(m)
        if m == 'audio': return np.full(64, np.nan) if x is None else np.concatenate([x[0].mean(-1).numpy(), x[0].std(-1).numpy()])
        x = x.numpy()
        if m == 'sensors': return np.concatenate([x.mean(0), x.std(0), x.min(0), x.max(0)])
        small = np.stack([cv2.resize(f.transpose(1, 2, 0), (8, 8), interpolation=cv2.INTER_AREA) for f in x])  # (T or 5, 8, 8, 3)
        return np.concatenate([small.mean(0).reshape(-1), small.std(0).reshape(-1)])
    X = {m: np.stack([feat(s, m) for s in samples]).astype(np.float32) for m in ('video', 'images', 'audio', 'sensors')}
    y = np.array([s.target for s in samples])
    return {'task': f'{len(WELD_CLASSES)}-class weld defect', 'metric': 'macro_f1', 'n': len(y), 'cv': '5-fold',
            **_chance(y), 'subsets': _subsets(X, y, 'classification', combos={'images+audio+sensors': ['images', 'audio', 'sensors']})}


# ---------------------------------------------------------------- solar: image sequences + solar wind -> kp
def solar(root:Path) -> dict:
    "R^2 of kp from each image channel's per-step brightness, from the solar wind (with speed x southward bz), and from all"
    samples = [s for ds in sample_splits('solar', root.parent).values() for s in ds]
    chans = ('193', '211', 'magnetogram')
    def img_feat(x:np.ndarray) -> np.ndarray:  # x: (T, H, W) one channel
        flat = x.reshape(len(x), -1)
        return np.concatenate([flat.mean(1), flat.max(1), np.sort(flat, 1)[:, -20:].mean(1)])
    X = {}
    for i, c in enumerate(chans): X[c] = np.stack([img_feat(s.inputs['frames'][:, i].numpy()) for s in samples])
    X['solar_wind'] = np.stack([np.concatenate([w.mean(0), w.min(0), w.max(0), [(w[:, 0]*np.maximum(-w[:, 2], 0)).mean()]])
                                for w in (s.inputs['series'].numpy() for s in samples)])  # speed, density, bz, bt
    y = np.array([float(s.target) for s in samples])
    return {'task': 'kp regression', 'metric': 'r2', 'n': len(y), 'cv': '5-fold', 'chance': 0.0,
            'subsets': _subsets(X, y, 'regression', combos={'images': list(chans)})}


SETS = {'night': night, 'inspection': inspection, 'weld': weld, 'solar': solar}


def render(name:str, entry:dict, detection:dict|None=None) -> str:
    "The README's ceilings section for one set, from its JSON entry (and, for night, benchmarks/night_detection.py's JSON)"
    m, subsets = entry['metric'], entry['subsets']
    head = (f"Computed by `benchmarks/ceilings.py`: {entry['task']}, {entry['cv']} cross-validation over all {entry['n']} samples. "
            f"Each score is the better of two simple models (linear, gradient boosting) on that modality's hand-crafted "
            f"features: what a simple model reaches, not a bound on a deep one.")
    if name == 'night':
        head += (" The appearance oracle is exact: the best any rule can do that sees only how an object looks in the listed "
                 "streams (`NIGHT_OBJECTS`), learned on train and val, scored on the test objects.")
    cols = ['modalities', m] + (['balanced_accuracy'] if m == 'macro_f1' else []) + (['appearance oracle (test)'] if name == 'night' else []) + ['best model']
    lines = [head, '', '| ' + ' | '.join(cols) + ' |', '|' + '---|'*len(cols)]
    for sub, s in subsets.items():
        vals = [sub, f"{s[m]:.3f}"] + ([f"{s['balanced_accuracy']:.3f}"] if m == 'macro_f1' else [])
        vals += [f"{s['oracle_balanced_accuracy']:.3f}"] if name == 'night' else []
        lines.append('| ' + ' | '.join(vals + [s['best_model']]) + ' |')
    singles = {k: s[m] for k, s in subsets.items() if len(s['modalities']) == 1}
    best = max(singles, key=singles.get)
    top = max((k for k in subsets if len(subsets[k]['modalities']) > 1), key=lambda k: subsets[k][m])
    lines += ['', f"Best single modality: {best} ({m} {singles[best]:.3f}); best combination: {top} ({subsets[top][m]:.3f})."]
    if 'chance_band' in entry:
        at_chance = [k for k in singles if subsets[k]['balanced_accuracy'] <= entry['chance_band']]
        lines += [f"Chance balanced accuracy {entry['chance']:.3f}; up to {entry['chance_band']:.3f} (chance + 2 standard errors over "
                  f"{entry['n']} samples) is at chance. At chance: {', '.join(at_chance) or 'none'}."]
    else:
        lines += [f"R^2 at or below {entry['chance']:.1f} (no better than the mean): "
                  f"{', '.join(k for k in singles if singles[k] <= entry['chance']) or 'none'}."]
    if name == 'night' and detection:
        h, d = detection['headline_metric'], detection['data']
        lines += ['', f"Trained detectors (`benchmarks/night_detection.py`, benchmarks/results/night_detection.json: YOLO11n, the same "
                      f"recipe for every model, {detection['split']} split of {d['test_frames']} frames with {d['test_persons']} persons "
                      f"and {d['test_decoys']} decoys):", '', f'| detector | {h} | mAP50 |', '|---|---|---|',
                  f"| fused (thermal + nvg + visual_enhanced) | {detection['fused']['test'][h]:.3f} | {detection['fused']['test']['mAP50']:.3f} |"]
        lines += [f"| {m} only | {v['best_phase_test'][h]:.3f} | {v['best_phase_test']['mAP50']:.3f} |" for m, v in detection['single'].items()]
    return '\n'.join(lines)


def fill_readme(readme:Path, section:str) -> str:
    "Replace everything after the ceilings mark in `readme` with `section`; return the new text"
    text = readme.read_text()
    if README_CEILINGS_MARK not in text: raise ValueError(f"{readme} has no ceilings mark; regenerate the sample data")
    return text[:text.index(README_CEILINGS_MARK)] + README_CEILINGS_MARK + '\n' + section + '\n'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--root', default=str(ROOT/'data'))
    ap.add_argument('--out', default=str(ROOT/'benchmarks'/'results'/'ceilings.json'))
    ap.add_argument('--sets', nargs='*', default=list(SETS))
    ap.add_argument('--readme-only', action='store_true', help='only rewrite the READMEs from the existing JSON')
    args = ap.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in ([] if args.readme_only else args.sets):
        results[name] = SETS[name](root/name)
        print(name, {k: round(v[results[name]['metric']], 3) for k, v in results[name]['subsets'].items()}, flush=True)
    if not args.readme_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(results, indent=1) + '\n')
    detection = json.loads(DETECTION.read_text()) if DETECTION.is_file() else None
    for name in args.sets:
        readme = root/name/'README.md'
        write_text_atomic(readme, fill_readme(readme, render(name, results[name], detection)))
    return results


if __name__ == '__main__':
    main()
