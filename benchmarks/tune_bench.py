"""mmfusion tune, side by side in one run: 2 workers vs 1 (trials per hour) and median pruning vs none (epochs trained for
the same number of trials), with the best validation value each study reached. Writes benchmarks/results/tune_bench.json.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/tune_bench.py            # weld, 12 trials a study (~15 min on 2 quiet cores)
"""
import argparse, datetime, json, os, platform, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('MPLBACKEND', 'Agg')
from mmfusion.core import write_json
from mmfusion.tune import tune

STUDIES = {'1 worker, median pruning': {'workers': 1, 'pruner': 'median'},
           '2 workers, median pruning': {'workers': 2, 'pruner': 'median'},
           '1 worker, no pruning': {'workers': 1, 'pruner': 'none'}}  # name -> tune arguments; the same seed, space and budget


def commit() -> str:
    try: return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError: return 'unknown'


def run_study(name:str, kw:dict, a, out:Path) -> dict:
    t0 = time.perf_counter()
    res = tune(a.config, a.space, trials=a.trials, out=out/name.replace(' ', '_').replace(',', ''), seed=a.seed, verbose=True, **kw)
    wall = time.perf_counter() - t0
    s = res.summary
    return {'workers': kw['workers'], 'pruner': kw['pruner'], 'trials': len(res.table), 'states': s['trials'],
            'wall_seconds': round(wall, 1), 'trials_per_hour': round(len(res.table) / wall * 3600, 1), 'epochs_total': s['epochs_total'],
            'best_value': s['best']['value'], 'best_trial': s['best']['trial'], 'best_params': s['best']['params'],
            'default_value': s['default']['value'] if s['default'] else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', default=str(ROOT/'configs'/'weld.yaml')); p.add_argument('--space', default=str(ROOT/'configs'/'weld_space.yaml'))
    p.add_argument('--trials', type=int, default=12); p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(ROOT/'benchmarks'/'results'/'tune_bench.json'))
    p.add_argument('--contention', default='', help='a note on other load on the machine during the run')
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix='tune_bench-'))
    load_before = os.getloadavg()
    results = {name: run_study(name, kw, a, work) for name, kw in STUDIES.items()}
    one, two, off = (results[n] for n in STUDIES)
    from mmfusion.tune import prepare_search
    from mmfusion.config import build_splits
    search = prepare_search(a.config, a.space)
    n_valid = len(build_splits({**search.resolved['data'], 'cache': False}, search.resolved['seed'])[search.valid])
    out = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'commit': commit(),
           'machine': {'platform': platform.platform(), 'python': platform.python_version(), 'cpus': os.cpu_count(),
                       'load_average_before': [round(x, 2) for x in load_before], 'load_average_after': [round(x, 2) for x in os.getloadavg()],
                       'contention': a.contention or 'not noted'},
           'recipe': {'command': ' '.join([Path(sys.executable).name, *sys.argv]), 'config': os.path.relpath(a.config, ROOT),
                      'space': os.path.relpath(a.space, ROOT), 'trials_per_study': a.trials, 'seed': a.seed,
                      'metric': search.metric, 'validation_samples': n_valid, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS')},
           'studies': results,
           'workers_2_vs_1': {'trials_per_hour_ratio': round(two['trials_per_hour'] / one['trials_per_hour'], 2), 'goal': 1.6},
           'pruning_on_vs_off': {'epochs_on': one['epochs_total'], 'epochs_off': off['epochs_total'],
                                 'epochs_saved_fraction': round(1 - one['epochs_total'] / off['epochs_total'], 3), 'goal': 0.4,
                                 'best_on': one['best_value'], 'best_off': off['best_value'],
                                 'best_difference_in_validation_samples': round((one['best_value'] - off['best_value']) * n_valid, 2),
                                 'noise_note': f"the validation accuracy moves in steps of 1/{n_valid}; one sample is the resolution"}}
    write_json(out, a.out)
    print(f"\n2 workers vs 1: {out['workers_2_vs_1']['trials_per_hour_ratio']}x trials/hour ({two['trials_per_hour']} vs {one['trials_per_hour']}; goal >= 1.6)")
    pr = out['pruning_on_vs_off']
    print(f"pruning: {pr['epochs_on']} vs {pr['epochs_off']} epochs for {a.trials} trials = {pr['epochs_saved_fraction']:.0%} saved (goal >= 40%); "
          f"best {pr['best_on']:.4f} vs {pr['best_off']:.4f} ({pr['best_difference_in_validation_samples']:+} validation samples)")
    print(f"results: {a.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
