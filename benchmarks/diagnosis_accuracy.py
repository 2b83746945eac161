"""Diagnosis accuracy on planted truth (issue 13, section 4): every planted case x task x fusion x seed is trained with the
library (`mmfusion.planted.train_planted`), diagnosed on its validation split, and each verdict compared with the planted
truth (`PlantedCase.expected`). Prints the table of cases x verdicts, the share of correct verdicts, and the false-problem
rate on healthy models (healthy runs with at least one 'problem' finding from any default check); writes
benchmarks/results/diagnosis_accuracy.json (atomically).
Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnosis_accuracy.py [--seeds 0 1] [--n-boot 500]
"""
from __future__ import annotations
import argparse, platform, sys, time
from pathlib import Path

OUT = Path(__file__).resolve().parent / 'results' / 'diagnosis_accuracy.json'

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--n-boot', type=int, default=500)
    p.add_argument('--cases', nargs='+', default=None, help='default: every case in PLANTED_CASES')
    p.add_argument('--tasks', nargs='+', default=None, help='default: every task in PLANTED_TASKS')
    p.add_argument('--fusions', nargs='+', default=None, help='default: every fusion in FUSION_NAMES')
    p.add_argument('--out', default=str(OUT))
    a = p.parse_args(argv)
    import pandas as pd, torch
    import mmfusion
    from mmfusion.planted import FUSION_NAMES, PLANTED_CASES, PLANTED_TASKS, check_planted, train_planted
    from mmfusion.core import write_json
    torch.set_num_threads(1)
    cases, tasks, a.fusions = a.cases or list(PLANTED_CASES), a.tasks or list(PLANTED_TASKS), a.fusions or list(FUSION_NAMES)
    tables, runs, t0 = [], [], time.perf_counter()
    for case in cases:
        for task in tasks:
            for fusion in a.fusions:
                for seed in a.seeds:
                    run = train_planted(case, task, fusion, seed=seed)
                    t = check_planted(run, n_boot=a.n_boot, seed=seed).assign(seed=seed)
                    tables.append(t)
                    runs.append({'case': case, 'task': task, 'fusion': fusion, 'seed': seed, 'train_seconds': round(run.seconds, 2),
                                 'correct': int(t.correct.sum()), 'verdicts': len(t)})
                    print(f"{case:8s} {task:14s} {fusion:13s} seed {seed}: {t.correct.sum()}/{len(t)} correct", flush=True)
    table = pd.concat(tables, ignore_index=True)
    healthy = table[(table.subject == 'problems')]
    false_problem = float((healthy.got != 'none').mean()) if len(healthy) else None
    pd.set_option('display.width', 250); pd.set_option('display.max_colwidth', 60); pd.set_option('display.max_rows', 2000)
    wide = table.pivot_table(index=['case', 'subject', 'expected'], columns=['task', 'fusion'], values='correct', aggfunc='mean')
    print('\nshare of seeds with the expected verdict (case x subject x expected, by task and fusion):')
    print(wide.round(2).to_string())
    wrong = table[~table.correct]
    if len(wrong): print('\nwrong verdicts:\n' + wrong[['case', 'task', 'fusion', 'seed', 'subject', 'expected', 'got', 'evidence']].to_string(index=False))
    by = lambda col: {str(k): round(float(v), 4) for k, v in table.groupby(col).correct.mean().items()}
    summary = {'correct_share': round(float(table.correct.mean()), 4), 'verdicts': len(table), 'correct': int(table.correct.sum()),
               'healthy_runs': len(healthy), 'false_problem_rate': false_problem,
               'by_case': by('case'), 'by_task': by('task'), 'by_fusion': by('fusion'), 'by_expected': by('expected')}
    print(f"\n{summary['correct']}/{summary['verdicts']} verdicts correct ({summary['correct_share']:.1%}); "
          f"false problems on healthy models: {sum(healthy.got != 'none')}/{len(healthy)}; {time.perf_counter() - t0:.0f}s")
    write_json({'summary': summary, 'seeds': a.seeds, 'n_boot': a.n_boot, 'cases': cases, 'tasks': tasks, 'fusions': a.fusions,
                       'mmfusion': mmfusion.__version__, 'torch': torch.__version__, 'python': platform.python_version(),
                       'seconds': round(time.perf_counter() - t0, 1), 'runs': runs,
                       'table': table[['case', 'task', 'fusion', 'seed', 'subject', 'expected', 'got', 'correct', 'evidence']].to_dict('records')}, a.out)
    print(f"wrote {a.out}")
    return 0 if summary['correct_share'] == 1 and not false_problem else 1

if __name__ == '__main__': sys.exit(main())
