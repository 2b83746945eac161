"""Load test of `mmfusion serve` on loopback, with and without micro-batching: requests/s, p50/p95 latency and errors at
concurrency 1 and 8, whether every answer equals the one-at-a-time answer, server RSS -> benchmarks/results/serve_load.json.

The run that writes benchmarks/results/serve_load.json (from the repository root, on cores nothing else is using; it
trains its own 2-epoch inspection run first), then the notebook whose prose reads that file:

    HF_HUB_OFFLINE=1 PYTHONHASHSEED=0 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --scenario inspection --requests 3200 --rounds 16 --levels 1 8 --max-batch 8 --max-wait-ms 2 --workers 2
    .venv/bin/python .ci/execute_nb.py nbs/10_serve.ipynb

Starts four real servers (`mmfusion serve RUN_DIR --port P --max-batch N --workers W`, bound to 127.0.0.1) as
subprocesses: one with `--max-batch 1` (each request alone, the server before micro-batching), one batching, one
batching in `--workers` processes (one batch at a time in each, serve's default there), and the same with two batches
in flight in each (one process's default: the reason it is not theirs; left out when --max-concurrency sets them all); it sends a bounded number of multipart requests (a CT image file + its metadata row,
cycling over the inspection test cells; or every weld file) at each concurrency level from an asyncio client in this
process, the servers taking turns (`--rounds`), so a change in the machine's load hits all alike. The client shares
the machine's cores with the servers: on a 2-core machine it takes CPU a server would use, which the JSON records with
the machine. It is a lean HTTP/1.1 client (one keep-alive connection per concurrent sender, pre-encoded bodies), as a
load generator should be, so that what is measured is the server. The goal compares the best requests/s at the highest
concurrency with the best at the lowest, over all servers (a server slow alone cannot flatter its own ratio), over the
whole run and as the median of the rounds' own ratios (a round's two levels run minutes apart at most, so a drift in
the machine's speed moves both). Any non-200 answer is an
error; the script exits non-zero if there is one or if an answer differs from the reference (the no-batching answer at
concurrency 1) in label or by more than `--atol` in a probability. Without RUN_DIR it trains a 2-epoch run first.

    .venv/bin/python benchmarks/serve_load.py [RUN_DIR] [--scenario inspection|weld] [--requests 3200] [--levels 1 8] [--max-batch 8] [--workers 2]

Each round must be long enough for a batching server to reach its steady state: a round of a few dozen requests at
concurrency 8 lasts a fraction of a second and measures mostly the ramp-up (connections opening, the first batches
small), so the defaults send a couple of hundred requests per round and level.
Each multipart body is encoded once before the timing (a load generator on other machines would not spend these cores
on it); the CPU seconds the server's processes (the parent of a --workers server included, with the imports of the CLI) and the client spend per request at each level are recorded with the
throughput, so a result says which side the cores went to. The figures are in benchmarks/results/serve_load.json (date,
commit, machine, recipe); nothing measured is typed here.
"""
import argparse, asyncio, itertools, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import httpx, pandas as pd

from mmfusion.core import write_json

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'benchmarks'))
from provenance import provenance  # noqa: E402

HOST = '127.0.0.1'  # loopback only
OUT = ROOT/'benchmarks'/'results'/'serve_load.json'


def process_tree(pid:int) -> list:
    "`pid` and its descendants (a server started with --workers runs its model in child processes), from /proc"
    kids = [int(k) for t in Path(f'/proc/{pid}/task').iterdir() for k in (t/'children').read_text().split()]
    return [pid] + [q for k in kids for q in process_tree(k)]


def pss_mib(pid:int) -> float:
    "Proportional memory of a process and its descendants (pages shared between them counted once in all), from /proc"
    return sum(next(int(l.split()[1]) for l in Path(f'/proc/{q}/smaps_rollup').read_text().splitlines() if l.startswith('Pss:'))
               for q in process_tree(pid)) / 1024


def cpu_by_process(pid:int) -> dict:
    "pid -> user + system CPU seconds so far, for a process and its descendants, from /proc"
    out = {}
    for q in process_tree(pid):
        fields = Path(f'/proc/{q}/stat').read_text().rsplit(')', 1)[1].split()
        out[q] = (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    return out


class Connection:
    "One keep-alive HTTP/1.1 connection that POSTs pre-encoded bodies and reads Content-Length answers: a lean load generator"
    def __init__(self, url:str): self.host, self.port = url.split('//')[1].split(':')[0], int(url.rsplit(':', 1)[1]); self.r = self.w = None
    async def post(self, path:str, body:bytes, ctype:str) -> tuple:
        "(status, body) of one request; a connection the server closed is opened again for the next"
        if self.w is None: self.r, self.w = await asyncio.open_connection(self.host, self.port)
        self.w.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        lines = (await self.r.readuntil(b"\r\n\r\n")).decode('latin-1').split("\r\n")
        size = next((int(l.split(':', 1)[1]) for l in lines[1:] if l.lower().startswith('content-length:')), None)
        if size is None: raise RuntimeError(f"answer without Content-Length: {lines[0]}")
        return int(lines[0].split()[1]), await self.r.readexactly(size)
    async def close(self):
        "Close the connection, if open"
        w, self.r, self.w = self.w, None, None
        if w is not None:
            w.close()
            try: await w.wait_closed()
            except OSError: pass


def encoded(reqs:list) -> list:
    "(body, content type, sample id) of each multipart request, encoded once"
    out = []
    for files, data in reqs:
        r = httpx.Request('POST', f'http://{HOST}/predict/files', files=files, data=data)
        out.append((r.read(), r.headers['content-type'], data['id']))
    return out


def payloads(scenario:str, n:int=8) -> list:
    "(files, data) of one multipart request per test sample (up to n)"
    d = ROOT/'data'
    if scenario == 'inspection':
        sids = [l.split('\t')[0].split('/')[-1].rsplit('.', 1)[0] for l in (d/'inspection'/'test.txt').read_text().splitlines()][:n]
        rows = pd.read_csv(d/'inspection'/'metadata.csv', dtype=str).set_index('sample_id')
        return [([('image', (f'{s}.png', (d/'inspection'/'images'/f'{s}.png').read_bytes(), 'image/png'))],
                 {'metadata': json.dumps(rows.loc[s].to_dict()), 'id': s}) for s in sids]
    m = pd.read_csv(d/'weld'/'manifest.csv')
    out = []
    for sub in m[m.SPLIT.str.upper() == 'TEST'].SUBDIRS.iloc[:n]:
        s = d/'weld'/sub
        files = [('video', ('video.mp4', (s/'video.mp4').read_bytes(), 'video/mp4')),
                 *[('images', (p.name, p.read_bytes(), 'image/png')) for p in sorted((s/'images').glob('angle_*.png'))],
                 ('audio', ('audio.wav', (s/'audio.wav').read_bytes(), 'audio/wav')), ('sensors', ('sensors.csv', (s/'sensors.csv').read_bytes(), 'text/csv'))]
        out.append((files, {'id': s.name}))
    return out


async def level(url:str, bodies:list, concurrency:int, n:int, server_pid:int|None=None) -> tuple:
    "Send `n` requests (cycling over the `encoded` bodies) with `concurrency` in flight; (counts and CPU seconds, answers by sample id, latencies in s)"
    lat, errors, answers, todo = [], [], {}, iter(range(n))
    async def worker():
        conn = Connection(url)
        try:
            for i in todo:
                body, ctype, sid = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try: status, got = await asyncio.wait_for(conn.post('/predict/files', body, ctype), 120)
                except (OSError, RuntimeError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:  # counted, and a new connection for the next
                    errors.append(f"no answer: {e!r}"); await conn.close(); continue
                lat.append(time.perf_counter() - t0)
                if status != 200: errors.append(f"{status}: {got[:200].decode(errors='replace')}")
                else: answers.setdefault(sid, []).append(json.loads(got))
        finally: await conn.close()
    s0, c0, t0 = cpu_by_process(server_pid) if server_pid else {}, time.process_time(), time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    s1 = cpu_by_process(server_pid) if server_pid else {}
    ranked = sorted((s1[q] - s0.get(q, 0.) for q in s1), reverse=True)  # the server's processes, busiest first: with --workers, did both work?
    cpu = {'server_cpu_s': sum(ranked) if server_pid else None, 'server_cpu_s_busiest_first': ranked, 'client_cpu_s': time.process_time() - c0}
    return ({'requests': n, 'errors': len(errors), 'seconds': wall, 'req_per_s': round(n / wall, 2), 'first_error': errors[0] if errors else '', **cpu}, answers, lat)


def differences(answers:dict, reference:dict) -> tuple:
    "(answers whose label differs from the reference, largest probability / value difference)"
    labels, diff = 0, 0.
    for sid, got in answers.items():
        ref = reference[sid]
        for a in got:
            labels += a.get('label') != ref.get('label')
            for k in ('probabilities', 'values'):
                if ref.get(k) is None: continue
                x, y = (list(a[k].values()), list(ref[k].values())) if k == 'probabilities' else (a[k], ref[k])
                diff = max([diff] + [abs(u - v) for u, v in zip(x, y)])
    return labels, diff


def model_costs(run_dir:str, reqs:list, max_batch:int, reps:int=5) -> dict:
    "Where a request's model-side time goes, in this process (1 thread): decoding its inputs alone (`prepare`) and in a batch (`prepare_batch`), the forward pass at batch 1 and `max_batch`"
    import torch
    from mmfusion.deploy import load_predictor
    torch.set_num_threads(1)
    p = load_predictor(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix='serve-load-'))
    inputs = []
    for k, (files, data) in enumerate(reqs):  # the uploads as the server saves them: a path per file (a list for repeated fields)
        paths = {}
        for i, (field, (name, content, _)) in enumerate(files):
            (tmp/f'{k}_{i}_{name}').write_bytes(content); paths.setdefault(field, []).append(str(tmp/f'{k}_{i}_{name}'))
        x = {f: v if len(v) > 1 else v[0] for f, v in paths.items()}
        x.update({f: json.loads(v) for f, v in data.items() if f != 'id'})
        inputs.append(x)
    if not hasattr(p, 'prepare') or not hasattr(p, 'collate'): return {'note': f'{type(p).__name__} has no prepare/collate to time apart'}
    samples = [p.prepare(x, str(i)) for i, x in enumerate(inputs)]
    def ms(f):
        f(); t0 = time.perf_counter()
        for _ in range(reps): f()
        return (time.perf_counter() - t0) / reps * 1000
    one, many = p.collate(samples[:1]), p.collate((samples * max_batch)[:max_batch])
    batch = (inputs * max_batch)[:max_batch]
    return {'prepare_ms_alone': round(ms(lambda: [p.prepare(x, 'r') for x in inputs]) / len(inputs), 2),
            f'prepare_ms_per_request_batch_{max_batch}': round(ms(lambda: p.prepare_batch(batch, [str(i) for i in range(len(batch))])) / max_batch, 2),
            'forward_ms_batch_1': round(ms(lambda: p.outputs(one)), 2),
            f'forward_ms_per_request_batch_{max_batch}': round(ms(lambda: p.outputs(many)) / max_batch, 2)}


def run_server(run_dir:str, port:int, max_batch:int, max_wait_ms:float, max_concurrency:int|None, env:dict, workers:int=1) -> subprocess.Popen:
    "`mmfusion serve` in a subprocess (`max_concurrency` None: serve's default), once /health has been answered by each of its `workers` processes"
    server = subprocess.Popen([sys.executable, '-c', 'from mmfusion.cli import main; main()', 'serve', run_dir, '--host', HOST, '--port', str(port),
                               '--max-batch', str(max_batch), '--max-wait-ms', str(max_wait_ms), '--workers', str(workers),
                               *(['--max-concurrency', str(max_concurrency)] if max_concurrency is not None else [])],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = set()
    for _ in range(1200):
        try:  # a new connection each time: it goes to whichever process accepts it first
            seen.add(httpx.get(f'http://{HOST}:{port}/health', timeout=1).json()['process'])
            if len(seen) == workers: return server
        except httpx.TransportError: pass
        time.sleep(0.1)
        if server.poll() is not None: sys.exit(f"server exited:\n{server.stderr.read()[-3000:]}")
    server.terminate(); sys.exit("server did not answer /health within 2 minutes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('run_dir', nargs='?', help='a run folder (default: train a 2-epoch run of --scenario)')
    ap.add_argument('--scenario', default='inspection', choices=['inspection', 'weld'])
    ap.add_argument('--requests', type=int, default=3200, help='requests per concurrency level (over all rounds)')
    ap.add_argument('--levels', type=int, nargs='+', default=[1, 8])
    ap.add_argument('--rounds', type=int, default=16, help='the requests of a level are sent in this many turns, alternating the servers')
    ap.add_argument('--max-batch', type=int, default=8, help='the batching server\'s --max-batch (the other runs --max-batch 1)')
    ap.add_argument('--max-wait-ms', type=float, default=2.)
    ap.add_argument('--max-concurrency', type=int, default=None, help="batches (or requests) running at once in each server process (default: serve's, 2 in one process and 1 in each of several)")
    ap.add_argument('--workers', type=int, default=2, help='processes of the multi-process servers (batching, `mmfusion serve --workers`)')
    ap.add_argument('--atol', type=float, default=1e-6, help='largest probability difference counted as the same answer')
    ap.add_argument('--port', type=int, default=8765, help="the first server's port; the others listen on the next ones")
    ap.add_argument('--out', default=str(OUT))
    a = ap.parse_args()
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    run_dir = a.run_dir
    if run_dir is None:
        runs = tempfile.mkdtemp()
        subprocess.run([sys.executable, '-c', 'from mmfusion.cli import main; main()', 'train', f'configs/{a.scenario}.yaml', '--quiet',
                        '--set', f'runs_dir={runs}', '--set', 'training.epochs=2', '--set', 'training.tensorboard=false'], cwd=ROOT, env=env, check=True)
        run_dir = str(Path(runs)/a.scenario)
    reqs = payloads(a.scenario)
    modes = {'one at a time': (1, 1, a.max_concurrency), 'micro-batching': (a.max_batch, 1, a.max_concurrency),  # (max batch, processes, batches in flight in each)
             f'micro-batching, {a.workers} processes': (a.max_batch, a.workers, a.max_concurrency)}
    if a.max_concurrency is None: modes[f'micro-batching, {a.workers} processes of 2 batches'] = (a.max_batch, a.workers, 2)  # one process's default in each: why it is not theirs
    bodies = encoded(reqs)
    servers = {m: run_server(run_dir, a.port + k, b, a.max_wait_ms, mc, env, w) for k, (m, (b, w, mc)) in enumerate(modes.items())}
    urls = {m: f'http://{HOST}:{a.port + k}' for k, m in enumerate(modes)}
    parts, answers, rss, concurrency = {}, {}, {}, {}
    try:
        for m, url in urls.items(): asyncio.run(level(url, bodies, max(a.levels), 4 * len(bodies)))  # warm-up over several connections: first-call allocations are not load
        before = {m: pss_mib(s.pid) for m, s in servers.items()}
        for _ in range(a.rounds):  # the two servers take turns at each level, so a change in the machine's load hits both alike
            for c in a.levels:
                for m, url in urls.items():
                    row, got, lat = asyncio.run(level(url, bodies, c, a.requests // a.rounds, servers[m].pid))
                    parts.setdefault((m, c), []).append((row, lat))
                    for sid, g in got.items(): answers.setdefault((m, c), {}).setdefault(sid, []).extend(g)
        for m, url in urls.items():
            health = httpx.get(f'{url}/health').json()
            rss[m] = {'after_warmup_mib': round(before[m], 1), 'after_load_mib': round(pss_mib(servers[m].pid), 1),
                      'batch_sizes_run': health['batches'], 'batch_sizes_of': 'the process that answered /health (one of several with --workers)'}
            concurrency[m] = health['limits']['max_concurrency']  # what the server resolved, its default included
    finally:
        for s in servers.values(): s.terminate(); s.wait(10)
    rows = []
    for (m, c), ps in parts.items():
        lat = [x for _, l in ps for x in l]
        q = statistics.quantiles(lat, n=20)
        rows.append({'mode': m, 'max_batch': modes[m][0], 'processes': modes[m][1], 'max_concurrency': concurrency[m], 'concurrency': c, 'requests': sum(r['requests'] for r, _ in ps),
                     'errors': sum(r['errors'] for r, _ in ps), 'req_per_s': round(sum(r['requests'] for r, _ in ps) / sum(r['seconds'] for r, _ in ps), 2),
                     'req_per_s_by_round': [r['req_per_s'] for r, _ in ps], 'p50_ms': round(statistics.median(lat) * 1000, 1),
                     'p95_ms': round(q[18] * 1000, 1), 'first_error': next((r['first_error'] for r, _ in ps if r['first_error']), ''),
                     **{f'{side}_cpu_ms_per_request': round(sum(r[f'{side}_cpu_s'] for r, _ in ps) / sum(r['requests'] for r, _ in ps) * 1000, 2) for side in ('server', 'client')},
                     'server_cpu_share_busiest_first': [round(x / max(sum(r['server_cpu_s'] for r, _ in ps), 1e-9), 2)  # each round's busiest, then next
                                                        for x in [sum(v) for v in itertools.zip_longest(*[r['server_cpu_s_busiest_first'] for r, _ in ps], fillvalue=0.)]]})
    reference = {sid: got[0] for sid, got in answers[('one at a time', min(a.levels))].items()}
    for r in rows:
        r['label_differences'], r['max_abs_difference'] = differences(answers[(r['mode'], r['concurrency'])], reference)
    df = pd.DataFrame(rows)
    lo, hi = min(a.levels), max(a.levels)
    speed = {m: round(float(g.set_index('concurrency').req_per_s[hi] / g.set_index('concurrency').req_per_s[lo]), 2) for m, g in df.groupby('mode')}
    by_round = {m: [round(x / y, 2) for x, y in zip(g.set_index('concurrency').req_per_s_by_round[hi], g.set_index('concurrency').req_per_s_by_round[lo])]
                for m, g in df.groupby('mode')}  # the rounds' own ratios: how much the machine's load moved them
    top = {c: df[df.concurrency == c].sort_values('req_per_s').iloc[-1] for c in (lo, hi)}  # the fastest server at each level
    best = {'ratio': round(float(top[hi].req_per_s / top[lo].req_per_s), 2), f'c{hi}': {'mode': top[hi]['mode'], 'req_per_s': float(top[hi].req_per_s)},
            f'c{lo}': {'mode': top[lo]['mode'], 'req_per_s': float(top[lo].req_per_s)}}
    rounds = {c: [max(r) for r in zip(*df[df.concurrency == c].req_per_s_by_round)] for c in (lo, hi)}  # each round's fastest server
    best['by_round'] = [round(x / y, 2) for x, y in zip(rounds[hi], rounds[lo])]  # paired in time: the machine's drift hits both levels of a round
    best['median_of_rounds'] = round(statistics.median(best['by_round']), 2)
    identical = bool((df.label_differences == 0).all() and (df.max_abs_difference <= a.atol).all())
    result = {**provenance({'scenario': a.scenario, 'run_dir': run_dir, 'requests_per_level': a.requests, 'levels': a.levels,
                             'endpoint': '/predict/files (multipart)', 'samples': [d['id'] for _, d in reqs],
                             'rounds': a.rounds, 'command': ' '.join([Path(sys.executable).name, *sys.argv]), 'server': {'modes': {m: {'max_batch': b, 'processes': w, 'max_concurrency_per_process': concurrency[m]} for m, (b, w, _) in modes.items()},
                                        'max_wait_ms': a.max_wait_ms, 'OMP_NUM_THREADS': 1},
                             'client': 'asyncio HTTP/1.1 in the benchmark process (one keep-alive connection per concurrent sender), same machine; multipart bodies encoded once before timing',
                             'identical_means': f'same label and every probability within {a.atol} of the no-batching answer at concurrency {lo}'}),
              'rows': df.drop(columns='first_error').to_dict('records'), 'speedup': {m: {f'c{hi}_over_c{lo}': v, 'by_round': by_round[m]} for m, v in speed.items()},
              'errors': int(df.errors.sum()), 'identical': identical, 'server_memory_pss': rss,
              'model_side_costs': model_costs(run_dir, reqs, a.max_batch),
              'best': best, 'goal': {'c8_over_c1': 3.0, 'compared': f'best requests/s at concurrency {hi} over the best at {lo}, over all servers: '
                                                                    'the whole run and the median of its rounds both', 'met': bool(
                  best['ratio'] >= 3.0 and best['median_of_rounds'] >= 3.0 and df.errors.sum() == 0)}}
    write_json(result, a.out, indent=1)
    print(f"mmfusion serve {run_dir} ({a.scenario}, multipart /predict/files); {os.cpu_count()} CPUs, server OMP_NUM_THREADS=1")
    print(df.drop(columns='first_error').to_string(index=False))
    print(f"speed-up c{hi}/c{lo}: {speed} (by round: {by_round}); best c{hi} over best c{lo}: {best}; identical answers: {identical}; -> {a.out}")
    if df.errors.sum(): sys.exit(f"{df.errors.sum()} request(s) failed, e.g. {df.first_error[df.errors > 0].iloc[0]}")
    if not identical: sys.exit("batched answers differ from one-at-a-time answers")


if __name__ == '__main__': main()
