"""Load test of `mmfusion serve` on loopback: requests/s and p50/p95 latency at a few concurrency levels, error count, server RSS.

Starts the real server (`mmfusion serve RUN_DIR --port P`, bound to 127.0.0.1) as a subprocess, sends a bounded number of
multipart requests (the CT image file + the metadata row of the inspection scenario, or every weld file) at each
concurrency level, and reads the server's resident memory from /proc before the load and after it. Any non-200
answer counts as an error; the script exits non-zero if there is one. Without RUN_DIR it trains a 2-epoch run first.

    .venv/bin/python benchmarks/serve_load.py [RUN_DIR] [--scenario inspection|weld] [--requests 120] [--levels 1 4 8]

Measured 2026-12-01 on the 2-core development machine shared with other jobs (server: max_concurrency 2, 1 thread each):
    inspection, 100 requests/level:  c=1 41.3 req/s p50 24 ms p95 38 ms | c=4 41.7 req/s p50 92 ms p95 148 ms | c=8 42.0 req/s p50 191 ms p95 255 ms
    weld (video + 5 images + audio + sensors files), 60/level: c=1 9.3 req/s p50 114 ms p95 141 ms | c=4 21.3 req/s p50 183 ms p95 257 ms
                                                               | c=8 25.5 req/s p50 313 ms p95 418 ms
    errors 0 everywhere; server RSS 1088 -> 1091 MiB (inspection), 1111 -> 1116 MiB (weld). Nearly all of it is imports
    (torch alone is ~600 MiB resident; `import mmfusion.serve` ~1030 MiB, ultralytics and the rest of the library included).
"""
import argparse, asyncio, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import httpx, pandas as pd

ROOT = Path(__file__).resolve().parent.parent
HOST = '127.0.0.1'  # loopback only


def rss_mib(pid:int) -> float:
    "Resident memory of a process, from /proc"
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def payload(scenario:str) -> tuple:
    "(files, data) of one multipart request for the scenario's first test sample"
    d = ROOT/'data'
    if scenario == 'inspection':
        sid = (d/'inspection'/'test.txt').read_text().split('\t')[0].split('/')[-1].rsplit('.', 1)[0]
        row = pd.read_csv(d/'inspection'/'metadata.csv', dtype=str).set_index('sample_id').loc[sid].to_dict()
        img = d/'inspection'/'images'/f'{sid}.png'
        return [('image', (img.name, img.read_bytes(), 'image/png'))], {'metadata': json.dumps(row), 'id': sid}
    m = pd.read_csv(d/'weld'/'manifest.csv')
    s = d/'weld'/m[m.SPLIT.str.upper() == 'TEST'].SUBDIRS.iloc[0]
    files = [('video', ('video.mp4', (s/'video.mp4').read_bytes(), 'video/mp4')),
             *[('images', (p.name, p.read_bytes(), 'image/png')) for p in sorted((s/'images').glob('angle_*.png'))],
             ('audio', ('audio.wav', (s/'audio.wav').read_bytes(), 'audio/wav')), ('sensors', ('sensors.csv', (s/'sensors.csv').read_bytes(), 'text/csv'))]
    return files, {'id': s.name}


async def level(url:str, files, data, concurrency:int, n:int) -> dict:
    "Send `n` requests with `concurrency` in flight at a time; latency per request, throughput over the whole level"
    lat, errors, todo = [], [], iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker():
            for _ in todo:
                t0 = time.perf_counter()
                r = await client.post('/predict/files', files=files, data=data)
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200: errors.append(f"{r.status_code}: {r.text[:200]}")
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20)
    return {'concurrency': concurrency, 'requests': n, 'errors': len(errors), 'req_per_s': round(n / wall, 1),
            'p50_ms': round(statistics.median(lat) * 1000, 1), 'p95_ms': round(q[18] * 1000, 1), 'first_error': errors[0] if errors else ''}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('run_dir', nargs='?', help='a run folder (default: train a 2-epoch run of --scenario)')
    ap.add_argument('--scenario', default='inspection', choices=['inspection', 'weld'])
    ap.add_argument('--requests', type=int, default=120, help='requests per concurrency level')
    ap.add_argument('--levels', type=int, nargs='+', default=[1, 4, 8])
    ap.add_argument('--port', type=int, default=8765)
    a = ap.parse_args()
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    run_dir = a.run_dir
    if run_dir is None:
        runs = tempfile.mkdtemp()
        subprocess.run([sys.executable, '-c', 'from mmfusion.cli import main; main()', 'train', f'configs/{a.scenario}.yaml', '--quiet',
                        '--set', f'runs_dir={runs}', '--set', 'training.epochs=2', '--set', 'training.tensorboard=false'], cwd=ROOT, env=env, check=True)
        run_dir = str(Path(runs)/a.scenario)
    server = subprocess.Popen([sys.executable, '-c', 'from mmfusion.cli import main; main()', 'serve', run_dir, '--host', HOST,
                               '--port', str(a.port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f'http://{HOST}:{a.port}'
    try:
        for _ in range(600):
            try:
                if httpx.get(f'{url}/health', timeout=1).status_code == 200: break
            except httpx.TransportError: time.sleep(0.1)
            if server.poll() is not None: sys.exit(f"server exited:\n{server.stderr.read()[-3000:]}")
        files, data = payload(a.scenario)
        asyncio.run(level(url, files, data, 1, 3))  # warm-up: first-call allocations are not load
        before = rss_mib(server.pid)
        rows = [asyncio.run(level(url, files, data, c, a.requests)) for c in a.levels]
        after = rss_mib(server.pid)
    finally:
        server.terminate(); server.wait(10)
    df = pd.DataFrame(rows)
    print(f"mmfusion serve {run_dir} ({a.scenario}, multipart /predict/files) on {url}; {os.cpu_count()} CPUs, server OMP_NUM_THREADS=1")
    print(df.drop(columns='first_error').to_string(index=False))
    print(f"server RSS: {before:.0f} MiB after warm-up, {after:.0f} MiB after {a.requests * len(a.levels)} requests ({after - before:+.0f} MiB)")
    if df.errors.sum(): sys.exit(f"{df.errors.sum()} request(s) failed, e.g. {df.first_error[df.errors > 0].iloc[0]}")


if __name__ == '__main__': main()
