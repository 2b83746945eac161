"""mmfusion tune, side by side in one run: 2 workers vs 1 (trials and epochs per hour) and pruning vs none (epochs trained
for the same number of trials), with the best validation value each study reached and how much of a difference
between those best values is noise. Writes benchmarks/results/tune_bench.json.

The command to run (on quiet cores: nothing else running; the time a trial takes is in each study's `wall_seconds` and `trials` in benchmarks/results/tune_bench.json):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python benchmarks/tune_bench.py --trials 16 --noise-seeds 80 --contention "quiet: nothing else running"

The recipe, so the two comparisons measure one thing each:
- workers: '1 worker, no pruning' vs '2 workers, no pruning'. Without pruning every trial trains all its epochs, so the
  ratio of trials per hour is the parallel speed-up alone (with pruning on, each arm would prune other trials).
- pruning: each pruner (median, Hyperband) vs '1 worker, no pruning', one worker each, the same seed, space and number of
  trials: the epochs trained, and the best validation value reached. Every study draws its values at random (--sampler
  random, the default here), so the pruned and unpruned studies try the same values trial by trial (the JSON counts
  them: `same_values_tried`) and differ only in what the pruner stopped: the best values differ only when the pruner
  stopped the unpruned study's best trial. TPE (tune's default) learns from the values reported, so a pruned TPE study
  goes on to try other values than the unpruned one, and one pair of studies then compares two searches' luck as much as
  the pruner (--sampler tpe measures that instead).
- noise: the one-worker studies' best values, and the config's own, are re-trained on --noise-seeds seeds no trial used
  (identical values are trained once; --noise-processes trainings at a time) and compared per seed: the pruned study's
  best minus the unpruned one's, the mean with its 95% interval. "Equal within noise" means the whole interval lies
  within +-margin, a margin fixed before the run: one validation sample's worth of accuracy, 1/n_valid (--margin sets
  another). Next to it, as context, the run's own noise: the standard deviation over the seeds of the unpruned study's
  best values re-trained (a seed also re-draws the validation split, so it is the spread a user re-running that
  configuration sees), with the verdict that margin would give. "Different" means
  the interval excludes 0; otherwise "inconclusive". No interval (fewer than 2 seeds, or the same difference on every
  seed) gives no verdict (null), except identical best values, which are equal by construction.
- search vs default: the unpruned study's best values minus the config's own, per seed on the same seeds: whether the
  search found values better than the config's (its best trial beating trial 0 in the study is selection on one seed).
A smoke check of the script itself (the tiny in-memory data, a minute): add --smoke.
"""
import argparse, json, multiprocessing, os, shutil, sys, tempfile, time

import torch
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import statistics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'benchmarks'))
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('MPLBACKEND', 'Agg')
from provenance import provenance  # noqa: E402
from mmfusion.core import write_json
from mmfusion.config import build_splits
from mmfusion.tune import SAMPLERS, difference_verdict, mean_interval, prepare_search, retrain, tune

OFF = '1 worker, no pruning'
SMOKE_SPACE = {'params': {'training.lr': {'type': 'float', 'low': 1.0e-4, 'high': 3.0e-2, 'log': True},
                          'model.head.dropout': {'type': 'float', 'low': 0.0, 'high': 0.5}},
               'set': {'training.epochs': 6, 'data.tiny.n': 24, 'data.batch_size': 12}, 'metric': 'valid_loss'}  # --smoke: seconds a trial


def studies(pruners) -> dict:
    "name -> tune arguments: the unpruned reference, the same on 2 workers, and one study per pruner"
    return {OFF: {'workers': 1, 'pruner': 'none'}, '2 workers, no pruning': {'workers': 2, 'pruner': 'none'},
            **{f"1 worker, {p} pruning": {'workers': 1, 'pruner': p} for p in pruners}}


def run_study(name:str, kw:dict, a, out:Path) -> dict:
    t0 = time.perf_counter()
    res = tune(a.config, a.space, trials=a.trials, out=out/name.replace(' ', '_').replace(',', ''), seed=a.seed, sampler=a.sampler, verbose=True, **kw)
    wall = time.perf_counter() - t0
    s = res.summary
    return {'workers': kw['workers'], 'pruner': kw['pruner'], 'trials': len(res.table), 'states': s['trials'],
            'wall_seconds': round(wall, 1), 'trials_per_hour': round(len(res.table) / wall * 3600, 1), 'epochs_total': s['epochs_total'],
            'epochs_per_hour': round(s['epochs_total'] / wall * 3600, 1),
            'best_value': s['best']['value'], 'best_trial': s['best']['trial'], 'best_params': s['best']['params'],
            'best_is_default': bool(s['default']) and s['best']['trial'] == s['default']['trial'],
            'default_value': s['default']['value'] if s['default'] else None,
            'values_tried': [{p.key: t[p.key] for p in res.search.space.params if t.get(p.key) is not None and t[p.key] == t[p.key]}  # NaN: inactive
                             for t in res.table.to_dict('records')]}


def equal_verdict(d:dict, margin:float, same:bool) -> str|None:
    "'equal within noise' (the whole interval within +-margin), 'different' (it excludes 0), 'inconclusive', or None without an interval"
    if same: return 'equal within noise'  # the same best values: the same runs
    if d['low'] is None: return None
    if -margin <= d['low'] and d['high'] <= margin: return 'equal within noise'
    return 'different' if d['low'] > 0 or d['high'] < 0 else 'inconclusive'


def retrain_one(config, space, values:dict, seed:int, out:Path, name:str) -> float:
    "One training of the search's config with `values` on `seed`, scored as a trial is (run in a process of its own)"
    return retrain(prepare_search(config, space), values, [seed], out, name)[0]


def retrain_all(a, configs:dict, seeds, out:Path) -> dict:
    "name -> values re-trained on every seed, --noise-processes trainings at a time (each in its own process, 1 thread)"
    jobs = {(n, s): (a.config, a.space, v, s, out, n) for n, v in configs.items() for s in seeds}
    with ProcessPoolExecutor(a.noise_processes, mp_context=multiprocessing.get_context('spawn'), initializer=torch.set_num_threads, initargs=(1,)) as ex:
        done = {k: ex.submit(retrain_one, *j) for k, j in jobs.items()}
        got = {k: f.result() for k, f in done.items()}
    return {n: [got[(n, s)] for s in seeds] for n in configs}


def noise(results:dict, search, seeds, out:Path, a, one_sample:float) -> dict:
    "The one-worker studies' best values and the config's own re-trained on new seeds (identical values once); per pruned study, its best minus the unpruned one's per seed"
    keys = {name: 'default' if r['best_is_default'] else json.dumps(r['best_params'], sort_keys=True)
            for name, r in results.items() if r['workers'] == 1}  # the compared studies; 'default': the config's own values won
    distinct = [k for k in dict.fromkeys(keys.values()) if k != 'default']
    trained = retrain_all(a, {**{f"best-{i}": json.loads(k) for i, k in enumerate(distinct)}, 'default': {}}, seeds, out/'noise')
    by_key = {'default': trained['default'], **{k: trained[f"best-{i}"] for i, k in enumerate(distinct)}}
    own = keys[OFF] == 'default'  # the search's best is the config's own values
    sign = 1 if search.direction == 'maximize' else -1
    ref = by_key[keys[OFF]]
    sd = statistics.stdev(ref) if len(ref) > 1 else None
    margin = a.margin if a.margin is not None else one_sample
    res = {'seeds': list(seeds), 'margin': margin, 'margin_rule': '--margin' if a.margin is not None else 'one validation sample (1/n_valid), fixed before the run',
           'reference_spread': {**mean_interval(ref), 'sd': sd}, 'retrained': {n: by_key[k] for n, k in keys.items()},
           'default_retrained': trained['default']}
    for name, r in results.items():
        if r['pruner'] == 'none': continue
        d = mean_interval([sign * (m - o) for m, o in zip(res['retrained'][name], ref)])  # > 0: the pruned study's best values are better
        same = keys[name] == keys[OFF]
        res[name] = {'difference': d, 'same_best_values': same, 'verdict': equal_verdict(d, margin, same),
                     'verdict_within_seed_sd': equal_verdict(d, sd, same) if sd is not None or same else None}
    d = mean_interval([sign * (m - o) for m, o in zip(ref, res['default_retrained'])])  # > 0: the search's best values beat the config's own
    res['search_vs_default'] = {'compared': f"'{OFF}' best values minus the config's own, per seed", 'difference': d, 'same_values': own,
                                'verdict': 'the same values' if own else difference_verdict(d)}
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', default=str(ROOT/'configs'/'weld.yaml')); p.add_argument('--space', default=str(ROOT/'configs'/'weld_space.yaml'))
    p.add_argument('--trials', type=int, default=16, help='trials in every study (the same in every arm)')
    p.add_argument('--pruners', nargs='+', default=['median', 'hyperband'], choices=['median', 'hyperband'])
    p.add_argument('--noise-seeds', type=int, default=3, help='seeds the best values of each study are re-trained on (0: none)')
    p.add_argument('--noise-processes', type=int, default=2, help='re-trainings run at once, a process each')
    p.add_argument('--margin', type=float, default=None, help='the equivalence margin of best values (default: one validation sample, 1/n_valid)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--sampler', default='random', choices=list(SAMPLERS), help="every study's sampler (random: the studies try the same values)")
    p.add_argument('--smoke', action='store_true', help='the tiny in-memory data (configs/smoke.yaml), to check the script (written to --out only if given)')
    p.add_argument('--out', default=None, help='the JSON (default benchmarks/results/tune_bench.json)')
    p.add_argument('--contention', default='', help='a note on other load on the machine during the run')
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix='tune_bench-'))
    if a.smoke: a.config, a.space, a.out = str(ROOT/'configs'/'smoke.yaml'), SMOKE_SPACE, a.out or str(work/'tune_bench.json')
    a.out = a.out or str(ROOT/'benchmarks'/'results'/'tune_bench.json')
    load_before = os.getloadavg()
    results = {name: run_study(name, kw, a, work) for name, kw in studies(a.pruners).items()}
    search = prepare_search(a.config, a.space)
    seeds = [search.resolved['seed'] + 1 + i for i in range(a.noise_seeds)]
    n_valid = len(build_splits({**search.resolved['data'], 'cache': False}, search.resolved['seed'])[search.valid])
    nz = noise(results, search, seeds, work, a, 1 / n_valid) if seeds else None
    one, two, off = results[OFF], results['2 workers, no pruning'], results[OFF]
    out = {**provenance({'command': ' '.join([Path(sys.executable).name, *sys.argv]), 'config': os.path.relpath(a.config, ROOT),
                         'space': a.space if isinstance(a.space, dict) else os.path.relpath(a.space, ROOT), 'trials_per_study': a.trials,
                         'seed': a.seed, 'sampler': a.sampler, 'metric': search.metric, 'direction': search.direction, 'validation_samples': n_valid,
                         'noise_seeds': seeds, 'noise_processes': a.noise_processes, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS')}),
           'contention': {'note': a.contention or 'not noted', 'load_average_before': [round(x, 2) for x in load_before],
                          'load_average_after': [round(x, 2) for x in os.getloadavg()]},
           'studies': results,
           'workers_2_vs_1': {'compared': f"'{OFF}' vs '2 workers, no pruning' (every trial trains all its epochs)",
                              'trials_per_hour_ratio': round(two['trials_per_hour'] / one['trials_per_hour'], 3),
                              'epochs_per_hour_ratio': round(two['epochs_per_hour'] / one['epochs_per_hour'], 3), 'goal': 1.6},
           'pruning_on_vs_off': {name: {'epochs_on': r['epochs_total'], 'epochs_off': off['epochs_total'],
                                        'epochs_saved_fraction': round(1 - r['epochs_total'] / off['epochs_total'], 3), 'goal': 0.4,
                                        'best_on': r['best_value'], 'best_off': off['best_value'],
                                        'same_values_tried': sum(x == y for x, y in zip(r['values_tried'], off['values_tried'])),
                                        'noise': nz[name] if nz else None}
                                 for name, r in results.items() if r['pruner'] != 'none'},
           'noise': nz}
    write_json(out, a.out)
    w = out['workers_2_vs_1']
    print(f"\n2 workers vs 1 (no pruning): {w['trials_per_hour_ratio']}x trials/hour ({two['trials_per_hour']} vs {one['trials_per_hour']}), "
          f"{w['epochs_per_hour_ratio']}x epochs/hour; goal >= {w['goal']}")
    for name, pr in out['pruning_on_vs_off'].items():
        d = (pr['noise'] or {}).get('difference')
        nz_text = (f"; re-trained on {len(seeds)} new seeds, pruned best minus unpruned best {d['mean']:+.4g}"
                   + (f" (95% CI {d['low']:+.4g} to {d['high']:+.4g})" if d['low'] is not None else ' (no interval)')
                   + f", margin +-{nz['margin']:.4g}: {pr['noise']['verdict'] or 'no verdict'}"
                   + (f" (within the seed-to-seed SD +-{nz['reference_spread']['sd']:.4g}: {pr['noise']['verdict_within_seed_sd'] or 'no verdict'})"
                      if nz['reference_spread']['sd'] is not None else '')) if d else ''
        print(f"{name}: {pr['epochs_on']} vs {pr['epochs_off']} epochs for {a.trials} trials = {pr['epochs_saved_fraction']:.0%} saved "
              f"(goal >= {pr['goal']:.0%}); {pr['same_values_tried']} of {a.trials} trials tried the unpruned study's values; best in the study {pr['best_on']:.4f} vs {pr['best_off']:.4f}{nz_text}")
    if nz:
        d = nz['search_vs_default']['difference']
        print(f"search vs default: unpruned best minus the config's own, re-trained on {len(seeds)} new seeds, {d['mean']:+.4g}"
              + (f" (95% CI {d['low']:+.4g} to {d['high']:+.4g})" if d['low'] is not None else ' (no interval)') + f": {nz['search_vs_default']['verdict'] or 'no verdict'}")
    print(f"results: {a.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
