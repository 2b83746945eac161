"""GPU check (`make gpu-check`): everything in mmfusion that only a GPU exercises, in one command, results in one JSON.

1. the `#| cuda` notebook cells: `nbdev_test --flags cuda` over every notebook that has such cells (they never run in CI);
2. a short fused-detector training in bf16 (`training.precision: bf16`, the night config at 160 px, a few epochs of each
   phase on the shipped night set): finite losses, the autocast dtype the forward passes actually ran in, time per epoch,
   test mAP50-95 (a smoke check of the GPU path, not a benchmark of quality);
3. the detection latency benchmark on the GPU (`benchmarks/detection_latency.py --device cuda`, its own JSON:
   benchmarks/results/detection_latency_gpu.json).
Writes benchmarks/results/gpu_check.json (date, commit, machine, recipe, per-step status and seconds). Exits 2 with a
clear message, writing nothing, when no CUDA GPU is visible; exits 1 when a step failed (the JSON says which).
Run: .venv/bin/python benchmarks/gpu_check.py [--skip-notebooks] [--epochs 3]
"""
from __future__ import annotations
import argparse, os, subprocess, sys, tempfile, time, traceback
from pathlib import Path

import torch

from provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def cuda_notebooks() -> list:
    "Notebooks with at least one `#| cuda` cell"
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT/'nbs').rglob('*.ipynb') if '#| cuda' in p.read_text() and '.ipynb_checkpoints' not in str(p))


def run_notebooks(paths:list) -> dict:
    "nbdev_test --flags cuda on each notebook: status, seconds and the tail of the output"
    out = {}
    for nb in paths:
        t = time.perf_counter()
        p = subprocess.run([str(ROOT/'.venv'/'bin'/'nbdev_test'), '--flags', 'cuda', '--path', nb], cwd=ROOT, capture_output=True, text=True)
        out[nb] = {'ok': p.returncode == 0, 'seconds': round(time.perf_counter() - t, 1), 'tail': (p.stdout + p.stderr)[-2000:]}
        print(f"  {nb}: {'ok' if p.returncode == 0 else 'FAILED'} ({out[nb]['seconds']:.0f} s)", flush=True)
    return out


def bf16_training(epochs:int) -> dict:
    "A short night run on the GPU with bf16 autocast: the dtypes seen by the fused model's forward passes, losses, time, test mAP50-95"
    from mmfusion.detection import run_detection
    from mmfusion.training import Callback
    seen = set()

    class Dtypes(Callback):
        "Records the dtype of the fused model's head outputs during training (bf16 under autocast)"
        def after_loss(self, learn): seen.add(str(learn.loss.dtype) + ' loss')
        def before_fit(self, learn):
            self.hook = learn.model.head[-1].register_forward_hook(lambda m, i, o: seen.add(str((o['scores'] if isinstance(o, dict) else o[0]).dtype)))
        def after_fit(self, learn): self.hook.remove()

    t = time.perf_counter()
    run = run_detection(ROOT/'configs'/'night_person.yaml',
                        {'data': {'root': str(ROOT/'data')}, 'baseline': {'epochs': epochs, 'modalities': ['thermal']},
                         'training': {'epochs': epochs, 'precision': 'bf16', 'progress': False}, 'gate': None},
                        Path(tempfile.mkdtemp())/'night_bf16', cbs=[Dtypes()])
    losses = [h['train_loss'] for h in run.history if 'train_loss' in h]
    fused = run.table.loc['fused: all modalities'].to_dict()
    return {'ok': bool(losses) and all(map(lambda v: v == v and abs(v) != float('inf'), losses)) and 'torch.bfloat16' in seen,
            'dtypes_seen': sorted(seen), 'train_losses': losses, 'test': fused, 'seconds': round(time.perf_counter() - t, 1),
            'device': str(next(run.model.parameters()).device)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--skip-notebooks', action='store_true', help='skip step 1 (the #| cuda notebook cells)')
    p.add_argument('--epochs', type=int, default=3, help='epochs of each phase of the bf16 training')
    p.add_argument('--out', default='benchmarks/results/gpu_check.json')
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU, and none is visible here (torch.cuda.is_available() is False): nothing was run or written. "
              "Run `make gpu-check` on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('MPLBACKEND', 'Agg')
    from mmfusion.core import write_json
    t0, steps = time.perf_counter(), {}
    print(f"gpu-check on {torch.cuda.get_device_name(0)}", flush=True)
    if not a.skip_notebooks:
        print("1. #| cuda notebook cells (nbdev_test --flags cuda)", flush=True)
        nbs = run_notebooks(cuda_notebooks())
        steps['cuda_cells'] = {'ok': all(r['ok'] for r in nbs.values()), 'notebooks': nbs}
    print(f"2. bf16 fused-detector training ({a.epochs} epochs of each phase)", flush=True)
    try: steps['bf16_training'] = bf16_training(a.epochs)
    except Exception as e: steps['bf16_training'] = {'ok': False, 'error': f"{type(e).__name__}: {e}", 'traceback': traceback.format_exc()[-3000:]}
    print(f"   {'ok' if steps['bf16_training']['ok'] else 'FAILED'}", flush=True)
    print("3. detection latency on the GPU", flush=True)
    lat_out = 'benchmarks/results/detection_latency_gpu.json'
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'detection_latency.py'), '--device', 'cuda', '--out', lat_out], cwd=ROOT, capture_output=True, text=True)
    steps['latency'] = {'ok': r.returncode == 0, 'json': lat_out, 'seconds': round(time.perf_counter() - t, 1), 'tail': (r.stdout + r.stderr)[-2000:]}
    print(f"   {'ok' if r.returncode == 0 else 'FAILED'}", flush=True)
    ok = all(s['ok'] for s in steps.values())
    recipe = {'steps': list(steps), 'bf16_epochs': a.epochs, 'config': 'configs/night_person.yaml', 'notebooks': cuda_notebooks()}
    write_json({**provenance(recipe), 'ok': ok, 'steps': steps, 'total_seconds': round(time.perf_counter() - t0, 1)}, a.out)
    print(f"gpu-check {'passed' if ok else 'FAILED'}; wrote {a.out}")
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
