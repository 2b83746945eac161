"""How much two tune workers can gain on this machine, side by side in one run: the same weld trial trained alone and
two at once (the machine's own speed-up for two independent trainings, the most two workers can reach), next to
`tune` itself with 1 and 2 workers over the same number of trials. Rounds alternate so that drift in the machine's
speed reaches both. Writes benchmarks/results/two_workers_headroom.json.

Why: benchmarks/tune_bench.py's ratio of 2 workers to 1 in trials per hour moves from run to run on a 2-core
machine. This says how much of the gap to 2x is the machine (two trainings at once are each slower than one alone)
and how much is tune (worker start-up, the shared journal, the last trial running alone).

The command to run (on quiet cores: nothing else running; each round's seconds are in the JSON):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg .venv/bin/python benchmarks/two_workers_headroom.py --rounds 3 --trials 4
"""
import argparse, multiprocessing, os, statistics, sys, tempfile, time, shutil

import torch
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'benchmarks'))
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('MPLBACKEND', 'Agg')
from provenance import provenance  # noqa: E402
from mmfusion.core import write_json
from mmfusion.tune import prepare_search, retrain, tune


def train_once(config, space, seed:int, out:Path, name:str) -> float:
    "Seconds one training of the config's own values takes in this process"
    t0 = time.perf_counter()
    retrain(prepare_search(config, space), {}, [seed], out, name)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', default=str(ROOT/'configs'/'weld.yaml')); p.add_argument('--space', default=str(ROOT/'configs'/'weld_space.yaml'))
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds of every measurement')
    p.add_argument('--trials', type=int, default=4, help='trials in each tune study')
    p.add_argument('--out', default=str(ROOT/'benchmarks'/'results'/'two_workers_headroom.json'))
    p.add_argument('--contention', default='', help='a note on other load on the machine during the run')
    a = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix='two_workers_headroom-'))
    load_before = os.getloadavg()
    rounds = []
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('spawn'), initializer=torch.set_num_threads, initargs=(1,)) as ex:
        for f in [ex.submit(time.sleep, 1) for _ in range(2)]: f.result()  # both processes started (this script's imports re-run in each) before any timing
        for r in range(a.rounds):
            alone = ex.submit(train_once, a.config, a.space, 1, work, f"alone-{r}").result()
            t0 = time.perf_counter()
            pair = [ex.submit(train_once, a.config, a.space, 1 + i, work, f"pair-{r}-{i}") for i in range(2)]
            each = [f.result() for f in pair]
            together = time.perf_counter() - t0
            studies = {}
            for w in (1, 2):
                t0 = time.perf_counter()
                tune(a.config, a.space, trials=a.trials, workers=w, pruner='none', seed=r, out=work/f"tune-{r}-{w}", verbose=False, bar=False)
                studies[w] = time.perf_counter() - t0
            row = {'round': r, 'training_alone_s': round(alone, 2), 'two_trainings_each_s': [round(x, 2) for x in each],
                   'two_trainings_wall_s': round(together, 2), 'machine_speedup': round(2 * alone / together, 3),
                   'tune_1_worker_s': round(studies[1], 1), 'tune_2_workers_s': round(studies[2], 1),
                   'tune_speedup': round(studies[1] / studies[2], 3)}
            rounds.append(row)
            print(row, flush=True)
    machine, tuned = (statistics.median(r[k] for r in rounds) for k in ('machine_speedup', 'tune_speedup'))
    out = {**provenance({'command': ' '.join([Path(sys.executable).name, *sys.argv]), 'config': os.path.relpath(a.config, ROOT),
                         'space': os.path.relpath(a.space, ROOT), 'rounds': a.rounds, 'trials_per_study': a.trials,
                         'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS')}),
           'contention': {'note': a.contention or 'not noted', 'load_average_before': [round(x, 2) for x in load_before],
                          'load_average_after': [round(x, 2) for x in os.getloadavg()]},
           'rounds': rounds,
           'median': {'machine_speedup': machine, 'tune_speedup': tuned, 'tune_share_of_machine': round(tuned / machine, 3)},
           'goal': 1.6}
    write_json(out, a.out)
    print(f"\ntwo trainings at once vs one alone (the machine's ceiling for 2 workers): {machine:.3f}x (median of {a.rounds} rounds)\n"
          f"tune, 2 workers vs 1, {a.trials} trials a study: {tuned:.3f}x, {tuned / machine:.0%} of the machine's; goal for 2 workers >= {out['goal']}x"
          f"\nresults: {a.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
