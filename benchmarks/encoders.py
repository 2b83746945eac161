"""The weld plan's three frozen encoders at their checkpoints' real size: forward time and peak memory per sample.

DINOv2-base (3x224x224), AST (1024 frames x 128 mel bins) and V-JEPA 2 ViT-L (64 frames x 3x256x256) are built from their
transformers configs alone (`mmfusion.encoders.REAL_CONFIGS`, random weights, nothing downloaded) and run side by side in
one invocation, in fp32 and bf16, on the CPU (and on a GPU where one is available). Batch 1 = one sample.

Each (encoder, dtype, device) runs in a fresh subprocess, so one measurement's allocations never hide another's:
  - time: one warm-up forward, then `--repeats` timed forwards under `torch.inference_mode` (median), as wall-clock seconds
    and as this process's CPU seconds (with one thread, the compute cost: on a CPU shared with other jobs the wall-clock
    time grows with the load, the CPU time much less). V-JEPA 2 on a CPU
    is heavy: its warm-up runs a 16-frame clip and it is timed once (a full forward takes minutes on one thread).
  - peak memory (CPU): after the warm-up, malloc_trim returns freed pages to the system; then the resident-set size is
    sampled every 2 ms by a thread during the timed forwards, minus the resident set just before them (the model and the
    input already in memory) = the forward's working memory; the model's parameter
    bytes are reported beside it. tracemalloc is not used: it does not see torch's allocations.
  - peak memory (GPU): torch.cuda.max_memory_allocated during the timed forwards, minus the allocation before them.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/encoders.py [--threads 1] [--repeats 3] [--only dinov2,ast]
Writes benchmarks/results/encoders.json (date, commit, machine, recipe, one row per measurement).
"""
import argparse, ctypes, datetime, json, os, platform, statistics, subprocess, sys, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/'benchmarks'/'results'/'encoders.json'
SHAPES = {'dinov2': (3, 224, 224), 'ast': (1, 128, 1024), 'vjepa2': (64, 3, 256, 256)}  # one sample, as the reader makes it
CLASSES = {'dinov2': 'Dinov2Encoder', 'ast': 'ASTEncoder', 'vjepa2': 'VJEPA2Encoder'}


def _rss() -> int:
    "Resident-set size of this process in bytes (Linux /proc)"
    return int(Path('/proc/self/statm').read_text().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class PeakRSS:
    "Sample the resident set every `every` seconds in a thread; `peak` is the largest value seen"
    def __init__(self, every=0.002): self.every, self.peak, self._stop = every, _rss(), threading.Event()
    def _run(self):
        while not self._stop.is_set(): self.peak = max(self.peak, _rss()); time.sleep(self.every)
    def __enter__(self): self._t = threading.Thread(target=self._run, daemon=True); self._t.start(); return self
    def __exit__(self, *a): self._stop.set(); self._t.join(); self.peak = max(self.peak, _rss())


def measure_one(name, dtype_name, device, repeats, threads):
    "Time and memory of one encoder in one dtype on one device (run in its own process)"
    import torch
    from mmfusion import encoders
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[dtype_name]
    enc = getattr(encoders, CLASSES[name])(config=encoders.REAL_CONFIGS[name], dtype=str(dtype).split('.')[1]).eval().to(device)
    params = sum(p.numel() * p.element_size() for p in enc.parameters())
    x = torch.rand(1, *SHAPES[name], generator=torch.Generator().manual_seed(0)).to(device)  # float32 in, as readers make it: the encoder casts
    heavy = name == 'vjepa2' and device == 'cpu'
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    with torch.inference_mode():
        enc(x[:, :16] if heavy else x); sync()
        if device == 'cpu': ctypes.CDLL('libc.so.6').malloc_trim(0)  # hand the warm-up's freed pages back, so the resident set can show the next peak
        n = 1 if heavy else repeats
        if device == 'cuda': torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        times, cpu = [], []
        with PeakRSS() as rss:
            before = _rss()
            for _ in range(n):
                t0, c0 = time.perf_counter(), time.process_time()
                out = enc(x); sync()
                times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
        peak = (torch.cuda.max_memory_allocated() - base) if device == 'cuda' else rss.peak - before
    return {'encoder': name, 'checkpoint': encoders.CHECKPOINTS[enc.config.model_type], 'input': list(SHAPES[name]), 'dtype': dtype_name,
            'device': device, 'tokens': int(out.tokens.shape[1]), 'dim': int(out.tokens.shape[2]), 'timed_forwards': n,
            'seconds_per_sample': statistics.median(times), 'cpu_seconds_per_sample': statistics.median(cpu), 'peak_forward_mib': round(peak / 2**20, 1),
            'parameters_mib': round(params / 2**20, 1), 'memory_method': 'cuda max_memory_allocated delta' if device == 'cuda'
            else 'resident-set delta sampled every 2 ms'}


def machine(threads):
    import torch
    cpu = next((l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines() if l.startswith('model name')), platform.processor())
    return {'cpu': cpu, 'cpu_count': os.cpu_count(), 'threads': threads, 'torch': torch.__version__, 'load_average_at_end': os.getloadavg(),
            'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'platform': platform.platform()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=1); ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--only', default='dinov2,ast,vjepa2'); ap.add_argument('--one', nargs=3, metavar=('NAME', 'DTYPE', 'DEVICE'))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure_one(*a.one, a.repeats, a.threads))); return
    import torch
    load_start = os.getloadavg()
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name in a.only.split(','):
            for dt in ('fp32', 'bf16'):
                r = subprocess.run([sys.executable, __file__, '--one', name, dt, device, '--repeats', str(a.repeats), '--threads', str(a.threads)],
                                   capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': str(a.threads)})
                if r.returncode: raise SystemExit(f"{name} {dt} {device} failed:\n{r.stderr[-3000:]}")
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(f"{name:7} {dt} {device}: {rows[-1]['seconds_per_sample']:.3f} s/sample ({rows[-1]['cpu_seconds_per_sample']:.3f} CPU s), peak forward {rows[-1]['peak_forward_mib']} MiB "
                      f"(parameters {rows[-1]['parameters_mib']} MiB)", flush=True)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'commit': commit, 'machine': machine(a.threads),
           'recipe': ' '.join(['benchmarks/encoders.py'] + sys.argv[1:]) + f" (batch 1; warm-up then median of {a.repeats} timed forwards; "
                     "V-JEPA 2 on CPU: 16-frame warm-up, 1 timed 64-frame forward; random weights from REAL_CONFIGS)",
           'load_average_at_start': load_start, 'results': rows}  # other processes share the CPUs: the load says how much
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix('.json.tmp'); tmp.write_text(json.dumps(res, indent=1)); tmp.replace(OUT)
    print(f"wrote {OUT}")


if __name__ == '__main__': main()
