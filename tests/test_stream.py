"""`mmfusion stream` on generated mp4s made from the sample night frames: different frame rates, a stall, an early end, corrupt files,
Ctrl-C. Nothing crashes, absent modalities are marked with their reason, every record is what `DetectionPredictor` answers for
the same frames, and the process exits 0 with a summary."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import av, cv2, numpy as np, pytest, torch

from mmfusion.config import KindError
from mmfusion.data import DataError
from mmfusion.deploy import DetectionPredictor
from mmfusion.detection import MultiModalYOLO
from mmfusion.model import save_checkpoint
from mmfusion.stream import frame_tensor, stream

ROOT = Path(__file__).resolve().parent.parent
NIGHT = ROOT/'data'/'night'/'test'
MODALITIES = {'thermal': 1, 'nvg': 1, 'visual_enhanced': 3}
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'YOLO_OFFLINE': '1'}


def write_video(path, frames, pts=None, fps=10):
    "mpeg4 video of uint8 grey/RGB frames; `pts` in 1/fps units (a gap is a stall)"
    with av.open(str(path), 'w') as c:
        s = c.add_stream('mpeg4', rate=fps); s.height, s.width, s.pix_fmt = *frames[0].shape[:2], 'yuv420p'
        for f, t in zip(frames, pts if pts is not None else range(len(frames))):
            v = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.repeat(f[..., None], 3, 2) if f.ndim == 2 else f), format='rgb24'); v.pts = int(t)
            c.mux(s.encode(v))
        c.mux(s.encode(None))
    return path


def decode_all(path) -> list:
    cap, out = cv2.VideoCapture(str(path)), []
    while (got := cap.read())[0]: out.append(got[1])
    return out


@pytest.fixture(scope='module')
def night(tmp_path_factory):
    "An untrained night detector saved as a detection run (how the stream pairs, drops and writes does not depend on training), and the feeds"
    d = tmp_path_factory.mktemp('stream')
    torch.manual_seed(0)
    yolo = MultiModalYOLO(MODALITIES, 'yolo11n.yaml', imgsz=64)
    save_checkpoint({'config': yolo.config, 'state_dict': yolo.state_dict()}, d/'run'/'checkpoints'/'best.pt')
    (d/'run'/'config.yaml').write_text('kind: detection\nname: night\n')
    stems = sorted(p.stem for p in (NIGHT/'thermal').glob('*.png'))
    frames = {m: [cv2.imread(str(next((NIGHT/m).glob(f'{s}.*'))), cv2.IMREAD_UNCHANGED) for s in stems] for m in MODALITIES}
    frames['thermal'] = [(a / 257).astype(np.uint8) for a in frames['thermal']]
    feeds = {'thermal': write_video(d/'thermal.mp4', frames['thermal'][:24]),  # 10 fps, 2.4 s
             'nvg': write_video(d/'nvg.mp4', frames['nvg'][:8], pts=[0, 1, 2, 3, 8, 9, 10, 11], fps=5),  # 5 fps, no frame from 0.6 s to 1.6 s
             'visual_enhanced': write_video(d/'visual.mp4', [f[..., ::-1] for f in frames['visual_enhanced'][:7]], fps=7)}  # 7 fps, ends at 0.86 s
    (d/'garbage.mp4').write_bytes(os.urandom(5000))
    (d/'half.mp4').write_bytes(feeds['nvg'].read_bytes()[:feeds['nvg'].stat().st_size // 2])
    return d, DetectionPredictor.from_run(d/'run', conf=0.01), feeds


def records_of(path) -> list: return [json.loads(l) for l in Path(path).read_text().splitlines()]


def assert_paced(video, recs):
    "The overlay video lasts as long as the records span, at its own frame rate (a frame repeated until the next record)"
    cap = cv2.VideoCapture(str(video))
    fps, n = cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
    assert n >= len(recs) and abs(n - (round((recs[-1]['time'] - recs[0]['time']) * fps) + 1)) <= 2, (n, fps, recs[0]['time'], recs[-1]['time'])


def test_rates_stall_and_early_end_are_marked_and_every_record_is_the_detectors_answer(night):
    d, predictor, feeds = night
    s = stream(predictor, feeds, out=d/'out'/'night.mp4', jsonl=d/'out'/'night.jsonl', tolerance=0.3)
    recs = records_of(d/'out'/'night.jsonl')
    assert s.stopped == 'end of input' and s.frames == len(recs) > 10 and s.tolerance == 0.3, s
    assert {r['absent'].get('thermal') for r in recs} == {None}
    nvg = lambda lo, hi: {r['absent'].get('nvg') for r in recs if lo < r['time'] < hi}  # newest NVG frame: 0.6 s from 0.6 s to 1.6 s
    assert nvg(0.95, 1.55) == {'stale'} and nvg(1.65, 2.3) == {None}, [(r['timestamps'], r['absent']) for r in recs]
    assert {r['absent'].get('visual_enhanced') for r in recs if r['time'] >= 1.25} == {'ended'}  # its last frame: 6/7 s
    assert {r['absent'].get('visual_enhanced') for r in recs if r['time'] <= 0.5} == {None}
    for r in recs:
        assert r['missing'] == [m for m in MODALITIES if m in r['absent']]
        assert all((r['frames'][m] is None) == (m in r['absent']) for m in MODALITIES)
        assert all(0 <= r['time'] - r['timestamps'][m] <= 0.3 for m in MODALITIES if m not in r['absent'])  # paired within the tolerance
    assert [s.sources[m]['state'] for m in MODALITIES] == ['ended'] * 3 and s.sources['nvg']['absent'] == sum('nvg' in r['absent'] for r in recs)
    decoded = {m: [frame_tensor(a, c) for a in decode_all(feeds[m])] for m, c in MODALITIES.items()}
    for r in recs[::2]:  # the oracle: the predictor alone on the same decoded frames
        alone = predictor.predict({m: decoded[m][i] for m, i in r['frames'].items() if i is not None}, [str(r['frame'])])
        assert r['boxes'] == alone.to_dict()['boxes'], r['frame']
    assert sum(len(r['boxes']) for r in recs) > 0  # the oracle compared boxes, not only empty lists
    assert_paced(d/'out'/'night.mp4', recs)
    assert sorted(p.name for p in (d/'out').iterdir()) == ['night.jsonl', 'night.mp4']  # no temporary file left


def test_bad_sources_are_refused_before_the_stream_starts(night):
    d, predictor, feeds = night
    with pytest.raises(DataError, match='no such video file'): stream(predictor, {'thermal': d/'missing.mp4'})
    (d/'no_images').mkdir(exist_ok=True); (d/'no_images'/'notes.txt').write_text('not a frame')
    with pytest.raises(DataError, match='without images'): stream(predictor, {'thermal': d/'no_images'})
    with pytest.raises(ValueError, match="no modality 'depth'"): stream(predictor, {'depth': feeds['thermal']})
    (d/'fused').mkdir(exist_ok=True); (d/'fused'/'config.yaml').write_text('kind: fused\nname: x\n')
    with pytest.raises(KindError, match='is a fused run'): stream(d/'fused', {'thermal': feeds['thermal']})


def cli(d, *args) -> list:
    return [sys.executable, '-c', 'from mmfusion.cli import main; main()', 'stream', str(d/'run'), '--conf', '0.01', *map(str, args)]


@pytest.mark.slow  # a second `mmfusion` process (~10 s of imports); the same feeds are streamed in-process by nbs/10a_stream, and test_sigint_* checks the process's exit
def test_the_process_survives_corrupt_and_truncated_feeds_and_exits_0_with_a_summary(night):
    d, _, feeds = night
    out = d/'corrupt'
    done = subprocess.run(cli(d, '--thermal', feeds['thermal'], '--nvg', d/'half.mp4', '--visual', d/'garbage.mp4', '--jsonl', out/'d.jsonl', '--out', out/'v.mp4'),
                          capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'stream stopped (end of input)' in done.stdout and 'visual_enhanced <- video' in done.stdout and 'failed' in done.stdout, done.stdout
    recs = records_of(out/'d.jsonl')
    assert len(recs) > 5 and {r['absent'].get('visual_enhanced') for r in recs} == {'failed'}
    assert {r['absent'].get('thermal') for r in recs} == {None}
    assert recs[-1]['absent'].get('nvg') in ('ended', 'failed')  # cut at half its bytes: it stops (or never opens), the stream goes on
    assert_paced(out/'v.mp4', recs)


def test_sigint_stops_cleanly_with_complete_files(night):
    "Ctrl-C (SIGINT) part-way through image folders, with a garbage visible feed: exit 0, the summary, complete JSONL and video, no temporary file"
    d, _, _ = night
    out = d/'interrupted'
    p = subprocess.Popen(cli(d, '--thermal', NIGHT/'thermal', '--nvg', NIGHT/'nvg', '--visual', d/'garbage.mp4', '--fps', '4', '--jsonl', out/'d.jsonl', '--out', out/'v.mp4'),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        first = p.stdout.readline()
        assert first.startswith('streaming'), first + p.stderr.read()[-3000:]
        time.sleep(3)  # 32 frames at 4 fps: 8 s of input, stopped part-way
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 0, err[-3000:]
    assert 'stream stopped (interrupted)' in rest and 'visual_enhanced <- video' in rest and 'failed' in rest, rest + err
    recs = records_of(out/'d.jsonl')
    assert {r['absent'].get('visual_enhanced') for r in recs} == {'failed'} and {r['absent'].get('thermal') for r in recs} == {None}
    assert 0 < len(recs) < 32 and [r['frame'] for r in recs] == list(range(len(recs)))
    assert_paced(out/'v.mp4', recs)
    assert sorted(p.name for p in out.iterdir()) == ['d.jsonl', 'v.mp4']
