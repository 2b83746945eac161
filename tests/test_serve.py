"""The HTTP/WebSocket server on loopback: valid requests answer what the Predictor answers, bad ones get a 4xx naming the problem, and it keeps serving."""
import asyncio, errno, json, os, signal, socket, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx, numpy as np, pandas as pd, pytest, torch
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from mmfusion.deploy import DetectionPredictor, Predictor, load_predictor
from mmfusion.detection import MultiModalYOLO
from mmfusion.model import save_checkpoint
import mmfusion.serve
from mmfusion.serve import MicroBatcher, create_app, free_port, running_server, serve
from mmfusion.runs import train

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT/'data'
QUICK = [f'data.root={DATA}', 'training.epochs=2', 'training.progress=false', 'training.tensorboard=false']
WELD = DATA/'weld'/'samples'/'overlap_006'
CELL = 'cell_0003'
LIMIT = 1 << 20


def files_snapshot(*folders) -> set:
    return {(str(p), p.stat().st_size) for f in folders for p in Path(f).rglob('*') if p.is_file()}


def uploads_left() -> list:
    "Files in the servers' upload folders (each request deletes its own once answered)"
    return sorted(Path(tempfile.gettempdir()).glob('mmfusion-upload-*/*'))


@pytest.fixture(scope='module')
def servers(tmp_path_factory):
    "A real uvicorn server on a free loopback port per sample run (weld, inspection), each with its Predictor"
    d = tmp_path_factory.mktemp('runs')
    out = {}
    with __import__('contextlib').ExitStack() as stack:
        for c in ('weld', 'inspection'):
            run = train(ROOT/f'configs/{c}.yaml', QUICK + [f'runs_dir={d}'], verbose=False)
            p = Predictor.from_run(run.dir)
            url = stack.enter_context(running_server(create_app(p, max_bytes=LIMIT)))
            out[c] = (url, p, run.dir)
        torch.manual_seed(0)  # an untrained night detector saved as a run: serving boxes does not need a good one
        yolo = MultiModalYOLO({'thermal': 1, 'nvg': 1, 'visual_enhanced': 3}, 'yolo11n.yaml', imgsz=64)
        save_checkpoint({'config': yolo.config, 'state_dict': yolo.state_dict()}, d/'night'/'checkpoints'/'best.pt')
        (d/'night'/'config.yaml').write_text('kind: detection\nname: night\n')  # a run folder of kind detection: its checkpoint is all a predictor needs
        p = load_predictor(d/'night')
        out['night'] = (stack.enter_context(running_server(create_app(p, max_bytes=LIMIT))), p, d/'night')
        yield out


def weld_multipart():
    files = [('video', ('video.mp4', (WELD/'video.mp4').read_bytes(), 'video/mp4')),
             *[('images', (p.name, p.read_bytes(), 'image/png')) for p in sorted((WELD/'images').glob('angle_*.png'))],
             ('audio', ('audio.wav', (WELD/'audio.wav').read_bytes(), 'audio/wav')),
             ('sensors', ('sensors.csv', (WELD/'sensors.csv').read_bytes(), 'text/csv'))]
    paths = {'video': str(WELD/'video.mp4'), 'images': [str(p) for p in sorted((WELD/'images').glob('angle_*.png'))],
             'audio': str(WELD/'audio.wav'), 'sensors': str(WELD/'sensors.csv')}
    return files, paths


def inspection_row():
    return pd.read_csv(DATA/'inspection'/'metadata.csv', dtype=str).set_index('sample_id').loc[CELL].to_dict()


def close(a, b):
    "Same prediction up to float rounding (the server runs the same Predictor; JSON keeps floats exact, but allow 1e-6)"
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict): assert a[k].keys() == b[k].keys() and np.allclose(list(a[k].values()), list(b[k].values()), atol=1e-6)
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], float): assert np.allclose(a[k], b[k], atol=1e-6)
        else: assert a[k] == b[k], (k, a[k], b[k])


def test_health_and_schema(servers):
    assert isinstance(servers['night'][1], DetectionPredictor)
    for name, (url, p, _) in servers.items():
        h = httpx.get(f'{url}/health').json()
        assert h['status'] == 'ok' and list(h['modalities']) == p.modalities and h['outputs'] == p.kinds
        schema = httpx.get(f'{url}/openapi.json').json()
        assert {'/health', '/predict', '/predict/files'} <= set(schema['paths'])
        assert ('DetectionsResponse' if name == 'night' else 'PredictionResponse') in schema['components']['schemas']
        assert url.startswith('http://127.0.0.1:')


def test_weld_files_and_arrays_equal_the_predictor(servers):
    url, p, _ = servers['weld']
    files, paths = weld_multipart()
    expected = p.predict(paths, ids=['w1']).to_dict()
    got = httpx.post(f'{url}/predict/files', files=files, data={'id': 'w1'}, timeout=60)
    assert got.status_code == 200, got.text
    close(got.json(), expected)
    arrays = {m: p.specs[m].decode(v).tolist() for m, v in paths.items()}
    got = httpx.post(f'{url}/predict', json={'inputs': arrays, 'id': 'w1'}, timeout=60)
    assert got.status_code == 200, got.text
    close(got.json(), expected)
    partial = {m: arrays[m] for m in ('audio', 'sensors')}
    got = httpx.post(f'{url}/predict', json={'inputs': partial, 'id': 'w2'}, timeout=60).json()
    close(got, p.predict({m: paths[m] for m in ('audio', 'sensors')}, ids=['w2']).to_dict())
    assert got['missing'] == ['video', 'images']


def test_inspection_files_json_and_stream_equal_the_predictor(servers):
    url, p, _ = servers['inspection']
    img, row = DATA/'inspection'/'images'/f'{CELL}.png', inspection_row()
    expected = p.predict({'image': str(img), 'metadata': row}, ids=[CELL]).to_dict()
    got = httpx.post(f'{url}/predict/files', files={'image': (img.name, img.read_bytes(), 'image/png')},
                     data={'metadata': json.dumps(row), 'id': CELL})
    assert got.status_code == 200, got.text
    close(got.json(), expected)
    image = p.specs['image'].decode(str(img)).tolist()
    close(httpx.post(f'{url}/predict', json={'inputs': {'image': image, 'metadata': row}, 'id': CELL}).json(), expected)
    with connect(url.replace('http://', 'ws://') + '/stream') as ws:
        replies = []
        for msg in ({'inputs': {'image': image, 'metadata': row}, 'id': CELL}, {'inputs': {'nope': 1}}, 'not json',
                    {'inputs': {'image': image}, 'id': CELL}):
            ws.send(msg if isinstance(msg, str) else json.dumps(msg)); replies.append(json.loads(ws.recv()))
    assert [r['status'] for r in replies] == [200, 422, 422, 200]
    close(replies[0]['prediction'], expected)
    assert "unknown modality" in replies[1]['detail'] and 'not a request' in replies[2]['detail']
    close(replies[3]['prediction'], p.predict({'image': str(img)}, ids=[CELL]).to_dict())


def test_detection_run_serves_boxes(servers):
    url, p, _ = servers['night']
    night = DATA/'night'/'test'
    name = sorted((night/'thermal').glob('*.png'))[0].name  # the first test frame
    frame = {'thermal': night/'thermal'/name, 'nvg': night/'nvg'/name}
    expected = p.predict({m: str(f) for m, f in frame.items()}, ids=['f52']).to_dict()
    got = httpx.post(f'{url}/predict/files', files=[(m, (f.name, f.read_bytes(), 'image/png')) for m, f in frame.items()], data={'id': 'f52'})
    assert got.status_code == 200, got.text
    close(got.json(), expected)
    assert got.json()['missing'] == ['visual_enhanced'] and got.json()['size'] == list(p.specs['thermal'].decode(str(frame['thermal'])).shape[1:])
    bad = httpx.post(f'{url}/predict', json={'inputs': {'thermal': np.zeros((3, 8, 8)).tolist()}})
    assert bad.status_code == 422 and 'has shape (3, 8, 8), expected (1, any, any)' in bad.json()['detail']


def test_bad_requests_get_a_4xx_naming_the_problem(servers):
    before_uploads = uploads_left()
    (wurl, wp, wdir), (iurl, ip, idir) = servers['weld'], servers['inspection']
    watched = files_snapshot(wdir, idir, ROOT/'data')
    garbage = b'\x89PNG\r\n\x1a\n' + os.urandom(200)
    def chunks():  # a body without Content-Length, streamed past the limit
        for _ in range(3): yield b'x' * (LIMIT // 2)
    cases = {
        'unknown modality': (httpx.post(f'{iurl}/predict', json={'inputs': {'thermal': [[1.0]]}}), 422, "modality 'thermal': unknown modality"),
        'unknown modality (file)': (httpx.post(f'{iurl}/predict/files', files={'depth': ('d.png', garbage, 'image/png')}), 422, "modality 'depth': unknown modality"),
        'undecodable image': (httpx.post(f'{iurl}/predict/files', files={'image': ('cell.png', garbage, 'image/png')}), 422, "modality 'image'"),
        'undecodable video': (httpx.post(f'{wurl}/predict/files', files={'video': ('v.mp4', garbage, 'video/mp4')}), 422, "modality 'video'"),
        'undecodable audio': (httpx.post(f'{wurl}/predict/files', files={'audio': ('a.wav', b'RIFF nonsense', 'audio/wav')}), 422, 'cannot be decoded as audio'),
        'bad sensor csv': (httpx.post(f'{wurl}/predict/files', files={'sensors': ('s.csv', b'time,a\n0,zz\n', 'text/csv')}), 422, "modality 'sensors'"),
        'wrong shape': (httpx.post(f'{iurl}/predict', json={'inputs': {'image': np.zeros((1, 32, 32)).tolist()}}), 422, 'has shape (1, 32, 32), expected (1, 64, 64)'),
        'wrong shape (sensors)': (httpx.post(f'{wurl}/predict', json={'inputs': {'sensors': np.zeros((64, 5)).tolist()}}), 422, 'has shape (64, 5), expected (64, 6)'),
        'ragged array': (httpx.post(f'{iurl}/predict', json={'inputs': {'metadata': [1, [2, 3]]}}), 422, 'not a rectangular array'),
        'missing column': (httpx.post(f'{iurl}/predict', json={'inputs': {'metadata': {'voltage': 3.6}}}), 422, "lacks column(s) ['capacity_mah'"),
        'no inputs': (httpx.post(f'{iurl}/predict', json={'inputs': {}}), 422, 'no modality given'),
        'server-side path': (httpx.post(f'{wurl}/predict', json={'inputs': {'sensors': str(WELD/'sensors.csv')}}), 422, 'file paths are not accepted'),
        'server-side paths (list)': (httpx.post(f'{wurl}/predict', json={'inputs': {'images': ['/etc/passwd']}}), 422, 'file paths are not accepted'),
        'malformed JSON': (httpx.post(f'{iurl}/predict', content=b'{"inputs": ', headers={'content-type': 'application/json'}), 422, 'json'),
        'not JSON form field': (httpx.post(f'{iurl}/predict/files', data={'metadata': 'not json'}), 422, 'neither a file nor JSON'),
        'oversize (declared)': (httpx.post(f'{iurl}/predict/files', files={'image': ('big.png', b'0' * (LIMIT + 1), 'image/png')}), 413, f'exceeds the limit of {LIMIT} bytes'),
        'oversize (streamed)': (httpx.post(f'{iurl}/predict', content=chunks(), headers={'content-type': 'application/json'}), 413, f'exceeds the limit of {LIMIT} bytes'),
    }
    for name, (r, status, words) in cases.items():
        detail = json.dumps(r.json()['detail'])
        print(f"{name}: {r.status_code} {detail[:160]}")
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words.lower() in detail.lower(), (name, detail)
    # still serving, nothing written outside temporary folders, and no uploaded file left behind
    assert httpx.get(f'{iurl}/health').json()['status'] == 'ok'
    img = DATA/'inspection'/'images'/f'{CELL}.png'
    ok = httpx.post(f'{iurl}/predict/files', files={'image': (img.name, img.read_bytes(), 'image/png')}, data={'id': CELL})
    assert ok.status_code == 200
    close(ok.json(), ip.predict({'image': str(img)}, ids=[CELL]).to_dict())
    files, paths = weld_multipart()
    assert httpx.post(f'{wurl}/predict/files', files=files, timeout=60).status_code == 200
    assert files_snapshot(wdir, idir, ROOT/'data') == watched
    assert uploads_left() == before_uploads



def test_uploads_live_in_one_folder_that_goes_when_the_server_stops(servers, tmp_path):
    "`mmfusion serve` in its own process: an upload is written in the server's folder and deleted once answered; SIGTERM (uvicorn re-raises it, no exit handler runs) removes the folder"
    _, p, run_dir = servers['inspection']
    port, env = free_port(), {**os.environ, 'TMPDIR': str(tmp_path), 'OMP_NUM_THREADS': '1'}
    server = subprocess.Popen([sys.executable, '-c', 'from mmfusion.cli import main; main()', 'serve', str(run_dir), '--port', str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            try:
                if httpx.get(f'http://127.0.0.1:{port}/health', timeout=1).status_code == 200: break
            except httpx.TransportError: time.sleep(0.1)
            assert server.poll() is None, server.stderr.read()[-2000:]
        img = DATA/'inspection'/'images'/f'{CELL}.png'
        for _ in range(2):
            r = httpx.post(f'http://127.0.0.1:{port}/predict/files', files={'image': (img.name, img.read_bytes(), 'image/png')}, data={'id': CELL}, timeout=60)
            assert r.status_code == 200, r.text
        close(r.json(), p.predict({'image': str(img)}, ids=[CELL]).to_dict())
        folders = list(tmp_path.glob('mmfusion-upload-*'))
        assert len(folders) == 1 and list(folders[0].iterdir()) == [], folders  # one folder for the server, emptied after each request
    finally:
        server.terminate(); server.wait(30)
    assert list(tmp_path.glob('mmfusion-upload-*')) == []

def test_oversize_websocket_message_is_closed_with_1009(servers):
    "A WebSocket message over the limit is refused by the server: the client sees the close (1009, message too big), and the limit is the app's max_bytes"
    url = servers['inspection'][0].replace('http://', 'ws://') + '/stream'
    with connect(url, max_size=None) as ws:
        ws.send(json.dumps({'inputs': {'image': 'x' * (LIMIT + 10)}}))
        with pytest.raises(ConnectionClosedError) as e: ws.recv(timeout=30)  # a TimeoutError (no close seen) fails the test
    assert e.value.rcvd is not None and e.value.rcvd.code == 1009, f"closed with {e.value.rcvd}, expected 1009 (message too big)"
    assert str(LIMIT) in e.value.rcvd.reason, e.value.rcvd.reason
    with connect(url, max_size=None) as ws:  # just under the limit the app reads the message and answers in-stream
        head = '{"id": "big", "inputs": {"image": "'
        ws.send(head + 'x' * (LIMIT - 64 - len(head)) + '"}}')
        got = json.loads(ws.recv(timeout=30))
    assert got['status'] == 422 and 'file paths are not accepted' in got['detail'], got


def test_serve_reads_the_configs_data_root_by_default(servers, tmp_path, monkeypatch):
    "`serve(run)` refits the preprocessing on the config's data.root; `data_root=` replaces it"
    from test_deploy import run_reading_other_data  # a copy of the run whose config names other data (metadata voltage x10)
    run, other = run_reading_other_data(servers['inspection'][2], tmp_path)
    apps = []
    monkeypatch.setattr(mmfusion.serve.uvicorn.Server, 'run', lambda self, *a, **k: apps.append(self.config.app))  # build, do not block
    serve(run, port=free_port(), log_level='warning')
    serve(run, port=free_port(), data_root=DATA, log_level='warning')
    default, given = (a.state.predictor.specs['metadata'].tabular['state']['mean'] for a in apps)
    original = servers['inspection'][1].specs['metadata'].tabular['state']['mean']
    assert np.isclose(default[1], 10 * original[1]) and default[0] == original[0], (default, original)  # voltage is column 1
    assert given == original, (given, original)


def test_batcher_refuses_beyond_its_capacity_and_answers_the_rest():
    "capacity = max_concurrency x max_batch in progress + max_queue waiting; the next one is refused, the accepted ones answered"
    async def scenario():
        gate = threading.Event()
        b = MicroBatcher(lambda xs, ids: (gate.wait(10), [x * 10 for x in xs])[1], max_batch=2, max_wait_ms=0, max_concurrency=1, max_queue=1)
        held = [asyncio.ensure_future(b.submit(x, str(x))) for x in range(3)]
        await asyncio.sleep(0.05)  # a batch of 2 is running, one request waits
        with pytest.raises(OverflowError, match='server busy: 3 requests'): await b.submit(9, '9')
        gate.set()
        return await asyncio.gather(*held), dict(b.sizes)
    answers, sizes = asyncio.run(scenario())
    assert answers == [0, 10, 20] and sizes == {2: 1, 1: 1}, (answers, sizes)


def inspection_requests(p, n):
    "n JSON requests, each another test cell (image array + metadata row)"
    cells = [l.split('\t')[0].split('/')[-1].rsplit('.', 1)[0] for l in (DATA/'inspection'/'test.txt').read_text().splitlines()][:n]
    rows = pd.read_csv(DATA/'inspection'/'metadata.csv', dtype=str).set_index('sample_id')
    return [{'inputs': {'image': p.specs['image'].decode(str(DATA/'inspection'/'images'/f'{c}.png')).tolist(), 'metadata': rows.loc[c].to_dict()}, 'id': c}
            for c in cells]


def test_concurrent_requests_are_batched_and_answer_as_one_at_a_time(servers):
    "Real concurrent HTTP requests to a real uvicorn server: gathered into batches, each answer what the Predictor gives that request alone; a bad one fails alone"
    _, p, _ = servers['inspection']
    reqs = inspection_requests(p, 12)
    reqs[5] = {'inputs': {'image': reqs[5]['inputs']['image'], 'metadata': {'voltage': 3.6}}, 'id': 'bad'}  # a missing column, in the middle of a batch
    reqs[7] = {'inputs': {'metadata': reqs[7]['inputs']['metadata']}, 'id': reqs[7]['id']}  # an absent modality next to present ones
    async def at_once(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post('/predict', json=r) for r in reqs])
    with running_server(create_app(p, max_batch=8, max_wait_ms=100)) as url:
        replies = asyncio.run(at_once(url))
        batches = {int(k): v for k, v in httpx.get(f'{url}/health').json()['batches'].items()}
    assert max(batches) > 1 and sum(k * v for k, v in batches.items()) >= len(reqs), batches
    for r, rep in zip(reqs, replies):
        if r['id'] == 'bad':
            assert rep.status_code == 422 and "lacks column(s) ['capacity_mah'" in rep.json()['detail'], rep.text
            continue
        assert rep.status_code == 200, rep.text
        close(rep.json(), p.predict(r['inputs'], [r['id']]).to_dict())
    assert replies[7].json()['missing'] == ['image']
    answered = [tuple(rep.json()['probabilities'].values()) for rep in replies if rep.status_code == 200]
    assert len(set(answered)) == len(answered)  # every request answered differently: an answer given to another request would show


def test_backpressure_answers_503_when_full(servers):
    "A server whose model is busy: the requests within capacity are answered once it frees, the one beyond gets 503"
    _, p, _ = servers['inspection']
    gate = threading.Event()
    class Busy:  # the inspection predictor, held until the gate opens
        record, specs, modalities, kinds, class_names = p.record, p.specs, p.modalities, p.kinds, p.class_names
        def predict(self, inputs, ids=None): gate.wait(30); return p.predict(inputs, ids)
    reqs = inspection_requests(p, 3)
    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            held = [asyncio.ensure_future(client.post('/predict', json=r)) for r in reqs[:2]]
            await asyncio.sleep(0.5)  # one running, one waiting
            refused = await client.post('/predict', json=reqs[2])
            gate.set()
            return await asyncio.gather(*held), refused
    with running_server(create_app(Busy(), max_batch=1, max_concurrency=1, max_queue=1)) as url:
        held, refused = asyncio.run(scenario(url))
    assert refused.status_code == 503 and 'server busy' in refused.json()['detail'], refused.text
    for r, rep in zip(reqs, held):
        assert rep.status_code == 200, rep.text
        close(rep.json(), p.predict(r['inputs'], [r['id']]).to_dict())


def test_segmentation_predictor_serves_masks_as_run_lengths_and_png():
    "An (untrained) segmentation model served: /predict/files answers the mask whose run lengths and PNG decode alike, equal to the predictor's"
    from mmfusion.segmentation import MultiModalDeepLab, SegmentationMask, SegmentationPredictor, rle_mask
    torch.manual_seed(0)
    p = SegmentationPredictor(MultiModalDeepLab(aspp_channels=16))
    ct = sorted((DATA/'battery_seg'/'test'/'ct').glob('*.png'))[0]
    density = DATA/'battery_seg'/'test'/'density'/ct.name
    expected = p.predict({'ct': str(ct), 'density': str(density)}, ['s1']).to_dict()
    with running_server(create_app(p)) as url:
        assert 'SegmentationMaskResponse' in httpx.get(f'{url}/openapi.json').json()['components']['schemas']
        got = httpx.post(f'{url}/predict/files', files=[('ct', (ct.name, ct.read_bytes(), 'image/png')), ('density', (ct.name, density.read_bytes(), 'image/png'))],
                         data={'id': 's1'}, timeout=60)
        alone = httpx.post(f'{url}/predict/files', files=[('ct', (ct.name, ct.read_bytes(), 'image/png'))], data={'id': 's2'}, timeout=60)
    assert got.status_code == 200, got.text
    assert got.json() == expected
    assert torch.equal(rle_mask(got.json()['rle']), SegmentationMask(**got.json()).mask())
    assert alone.status_code == 200 and alone.json()['missing'] == ['density'], alone.text


def test_a_worker_survives_an_unexpected_error_and_serves_the_next_request():
    "An exception outside the model call (planted in the batch bookkeeping) fails that batch's requests only; the worker lives on"
    class Exploding(dict):  # the first `sizes[n] += 1` raises
        armed = True
        def __missing__(self, k):
            if Exploding.armed: Exploding.armed = False; raise RuntimeError('planted')
            return 0
    async def scenario():
        b = MicroBatcher(lambda xs, ids: [x + 1 for x in xs], max_concurrency=1)
        b.sizes = Exploding()
        with pytest.raises(RuntimeError, match='planted'): await asyncio.wait_for(b.submit(1, 'a'), 10)
        return await asyncio.wait_for(b.submit(2, 'b'), 10)  # hangs (TimeoutError) if the only worker died
    assert asyncio.run(scenario()) == 3


def test_a_batch_that_fails_as_a_whole_is_answered_request_by_request(servers):
    "A predictor whose batched call fails (here: planted, when 'boom' is in the batch) answers the others as alone; 'boom' alone gets its own 500"
    _, p, _ = servers['inspection']
    class Fragile:
        record, specs, modalities, kinds, class_names = p.record, p.specs, p.modalities, p.kinds, p.class_names
        def predict(self, inputs, ids=None):
            if 'boom' in (ids or []): raise RuntimeError('planted: this input cannot share a forward pass')
            return p.predict(inputs, ids)
    reqs = inspection_requests(p, 6)
    reqs[2] = {**reqs[2], 'id': 'boom'}
    async def at_once(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post('/predict', json=r) for r in reqs])
    with running_server(create_app(Fragile(), max_batch=8, max_wait_ms=200)) as url:
        replies = asyncio.run(at_once(url))
        batches = {int(k): v for k, v in httpx.get(f'{url}/health').json()['batches'].items()}
    assert max(batches) > 1, batches
    assert replies[2].status_code == 500
    for r, rep in zip(reqs, replies):
        if r['id'] == 'boom': continue
        assert rep.status_code == 200, rep.text
        close(rep.json(), p.predict(r['inputs'], [r['id']]).to_dict())


def test_listening_socket_turns_nagle_off_on_its_connections():
    "asyncio sets TCP_NODELAY only on connections of a socket made with proto IPPROTO_TCP; without it each answer waits ~40 ms for a delayed ACK"
    from mmfusion.serve import listening_socket
    async def nodelay(sock):
        got = asyncio.get_running_loop().create_future()
        class Probe(asyncio.Protocol):
            def connection_made(self, transport): got.set_result(transport.get_extra_info('socket').getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, w = await asyncio.open_connection(*sock.getsockname()[:2])
        try: return await asyncio.wait_for(got, 10)
        finally: w.close(); server.close()
    assert asyncio.run(nodelay(listening_socket())) != 0
    plain = socket.socket(); plain.bind(('127.0.0.1', 0)); plain.listen()
    assert asyncio.run(nodelay(plain)) == 0  # the failure listening_socket prevents is real on this machine


def serve_two_processes(run_dir, log:Path) -> tuple:
    "`mmfusion serve RUN --workers 2` on a free port, once each process has answered /health: (process, port, the two pids)"
    port = free_port()
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, '-c', 'from mmfusion.cli import main; main()', 'serve', str(run_dir), '--port', str(port), '--workers', '2'],
                                env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=out, stderr=subprocess.STDOUT, text=True)
    pids, t0 = set(), time.time()
    try:
        while len(pids) < 2 and time.time() - t0 < 180:  # each new connection goes to whichever process accepts it first
            try: pids.add(httpx.get(f'http://127.0.0.1:{port}/health', timeout=30).json()['process'])
            except httpx.TransportError: pass
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert len(pids) == 2 and proc.pid not in pids, pids
    except BaseException: proc.kill(); raise
    return proc, port, pids


def test_serve_with_two_processes_answers_from_both_and_stops_them_all(servers, tmp_path):
    "`mmfusion serve --workers 2`: both processes answer on the one port (connections spread over them), each answer equals the Predictor's, each runs one batch at a time by default, and SIGTERM to the parent ends both"
    url, p, run_dir = servers['inspection']
    log = tmp_path/'serve.log'
    proc, port, pids = serve_two_processes(run_dir, log)
    base = f'http://127.0.0.1:{port}'
    try:
        row, image = inspection_row(), DATA/'inspection'/'images'/f'{CELL}.png'
        expected = p.predict({'image': str(image), 'metadata': row}, ids=[CELL]).to_dict()
        def ask(_):
            with httpx.Client(base_url=base, timeout=60) as c:
                return c.post('/predict/files', files={'image': (image.name, image.read_bytes(), 'image/png')}, data={'metadata': json.dumps(row), 'id': CELL}).json()
        with ThreadPoolExecutor(8) as ex: answers = list(ex.map(ask, range(16)))
        for a in answers: close(a, expected)
        assert httpx.get(f'{base}/health', timeout=30).json()['limits']['max_concurrency'] == 1  # each has its share of the cores: one batch at a time
    finally:
        proc.terminate()
        try: proc.wait(timeout=60)
        except subprocess.TimeoutExpired: proc.kill(); raise
    assert proc.returncode == 0, log.read_text()
    assert 'with 2 processes' in log.read_text(), log.read_text()
    for pid in pids:  # no orphan keeps the port
        with pytest.raises(ProcessLookupError): os.kill(pid, 0)


def test_serve_refuses_a_taken_port_before_loading_a_model_and_stops_when_a_process_fails(servers, tmp_path):
    "A port in use fails at once with the OS's error (not after the models load); a process that cannot start stops the server with an error"
    from mmfusion.serve import listening_socket
    run_dir = servers['inspection'][2]
    (tmp_path/'broken').mkdir()
    (tmp_path/'broken'/'config.yaml').write_text((Path(run_dir)/'config.yaml').read_text())  # a run folder without checkpoints
    with listening_socket() as taken:
        for workers in (1, 2):  # the broken run would fail its load: the port's error shows the port was checked first
            with pytest.raises(OSError) as e: serve(tmp_path/'broken', port=taken.getsockname()[1], workers=workers, log_level='warning')
            assert e.value.errno == errno.EADDRINUSE, e.value
    with pytest.raises(ValueError, match='workers must be >= 1'): serve(run_dir, workers=0)
    with pytest.raises(ValueError, match='fixed port'): serve(run_dir, port=0, workers=2)
    with pytest.raises(RuntimeError, match='a server process exited with code'):
        serve(tmp_path/'broken', port=free_port(), workers=2, log_level='warning')


def test_a_served_port_is_locked_and_a_killed_process_stops_the_whole_server(servers, tmp_path):
    "A second `serve --workers` on the same port is refused; when one process dies, the parent stops the other and exits with an error"
    url, p, run_dir = servers['inspection']
    log = tmp_path/'serve.log'
    proc, port, pids = serve_two_processes(run_dir, log)
    try:
        with pytest.raises(OSError, match='already served by another'): serve(run_dir, port=port, workers=2, log_level='warning')
        victim, other = sorted(pids)
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=60) != 0, log.read_text()
    finally:
        if proc.poll() is None: proc.kill()
    assert 'a server process exited with code' in log.read_text(), log.read_text()
    with pytest.raises(ProcessLookupError): os.kill(other, 0)
