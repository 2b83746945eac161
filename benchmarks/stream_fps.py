"""Sustained frame rate of `mmfusion stream` with three feeds against the detector alone, on the same machine and frames
-> benchmarks/results/stream_fps.json.

The feeds are mp4s made from the sample night test frames (thermal, NVG, enhanced visible), looped to `--seconds` of
input at `--input-fps` (default: twice the detector's own rate, so the stream is never waiting for frames). The
detector alone is `DetectionPredictor.predict` on one already decoded frame after another (no capture, pairing,
drawing or writing); it is measured before and after each of `--rounds` streams and the two are averaged, since the
machine's load can change. The stream runs in full: three capture threads, pairing, detection, the JSONL and the
overlay video. Its sustained rate is taken between its 5th and last records (the start-up wait excluded). The result
is the median over rounds of stream / detector alone; the goal is >= 0.8.

    .venv/bin/python benchmarks/stream_fps.py [RUN_DIR] [--seconds 10] [--rounds 3] [--input-fps F] [--imgsz 160]

Without RUN_DIR the detector is an untrained one with configs/night_person.yaml's architecture and image size (its
weights do not change its speed); the recipe records which. Nothing measured is typed here: see the JSON.
"""
import argparse, json, math, os, sys, tempfile, time
from pathlib import Path

import av, cv2, numpy as np, torch, yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'benchmarks'))
from provenance import provenance  # noqa: E402
from mmfusion.core import write_json  # noqa: E402
from mmfusion.deploy import DetectionPredictor  # noqa: E402
from mmfusion.detection import MultiModalYOLO  # noqa: E402
from mmfusion.model import save_checkpoint  # noqa: E402
from mmfusion.stream import frame_tensor, stream  # noqa: E402

OUT = ROOT/'benchmarks'/'results'/'stream_fps.json'
NIGHT = ROOT/'data'/'night'/'test'


def untrained_run(folder:Path, imgsz:int) -> Path:
    "A detection run folder holding an untrained detector with night_person.yaml's modalities, backbone and fusion"
    cfg = yaml.safe_load((ROOT/'configs'/'night_person.yaml').read_text())
    torch.manual_seed(0)
    yolo = MultiModalYOLO(cfg['data']['modalities'], cfg['baseline']['model'], fusion=cfg['model']['fusion'], base=cfg['model']['base'],
                          shared_backbone=cfg['model']['shared_backbone'], names=cfg['data']['class_names'], imgsz=imgsz)
    save_checkpoint({'config': yolo.config, 'state_dict': yolo.state_dict()}, folder/'checkpoints'/'best.pt')
    (folder/'config.yaml').write_text('kind: detection\nname: stream_bench\n')
    return folder


def night_frames(modalities) -> dict:
    "modality -> uint8 frames (grey, or RGB for 3 channels) of the night test set, in name order"
    stems = sorted(p.stem for p in (NIGHT/'thermal').glob('*.png'))
    out = {}
    for m in modalities:
        a = [cv2.imread(str(next((NIGHT/m).glob(f'{s}.*'))), cv2.IMREAD_UNCHANGED) for s in stems]
        out[m] = [(x / 257).astype(np.uint8) if x.dtype == np.uint16 else x[..., ::-1] if x.ndim == 3 else x for x in a]
    return out


def write_feed(path:Path, frames:list, n:int, fps:float) -> Path:
    "An mpeg4 video of `n` frames cycling over `frames` at `fps`"
    with av.open(str(path), 'w') as c:
        s = c.add_stream('mpeg4', rate=round(fps)); s.height, s.width, s.pix_fmt = *frames[0].shape[:2], 'yuv420p'
        for i in range(n):
            f = frames[i % len(frames)]
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.repeat(f[..., None], 3, 2) if f.ndim == 2 else f), format='rgb24')))
        c.mux(s.encode(None))
    return path


def detector_fps(predictor, frames:dict, seconds:float) -> dict:
    "Frames/s of `predictor.predict` on one decoded frame after another, for about `seconds`"
    tensors = {m: [frame_tensor(np.ascontiguousarray(f[..., ::-1]) if f.ndim == 3 else f, predictor.specs[m].shape[0]) for f in fs] for m, fs in frames.items()}
    n = len(next(iter(tensors.values())))
    predictor.predict({m: t[0] for m, t in tensors.items()})  # warm-up
    t0, i = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        predictor.predict({m: t[i % n] for m, t in tensors.items()}, [str(i)]); i += 1
    wall = time.perf_counter() - t0
    return {'frames': i, 'seconds': round(wall, 3), 'fps': round(i / wall, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('run_dir', nargs='?', help='a detection run (default: an untrained detector with night_person.yaml\'s architecture)')
    ap.add_argument('--seconds', type=float, default=10., help='stream length per round (the detector alone runs half as long before and after)')
    ap.add_argument('--rounds', type=int, default=3, help='streams, each between two measurements of the detector alone')
    ap.add_argument('--input-fps', type=float, default=None, help='frame rate of the feeds (default: twice the detector alone, rounded up)')
    ap.add_argument('--imgsz', type=int, default=None, help="working size of the untrained detector (default: the config's data.imgsz)")
    ap.add_argument('--conf', type=float, default=0.25)
    ap.add_argument('--out', default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    tmp = Path(tempfile.mkdtemp(prefix='stream-fps-'))
    imgsz = a.imgsz or yaml.safe_load((ROOT/'configs'/'night_person.yaml').read_text())['data']['imgsz']
    run_dir = Path(a.run_dir) if a.run_dir else untrained_run(tmp/'run', imgsz)
    predictor = DetectionPredictor.from_run(run_dir, conf=a.conf)
    frames = night_frames(predictor.modalities)
    alone = [detector_fps(predictor, frames, a.seconds / 2)]
    fps_in = a.input_fps or math.ceil(2 * alone[0]['fps'])
    n = int(a.seconds * fps_in)
    feeds = {m: write_feed(tmp/f'{m}.mp4', fs, n, fps_in) for m, fs in frames.items()}
    rounds = []
    for r in range(a.rounds):  # detector alone, stream, detector alone, ...: each stream between two measurements of the detector alone
        s = stream(predictor, feeds, out=tmp/f'overlay{r}.mp4', jsonl=tmp/f'detections{r}.jsonl')
        recs = [json.loads(l) for l in (tmp/f'detections{r}.jsonl').read_text().splitlines()]
        alone.append(detector_fps(predictor, frames, a.seconds / 2))
        steady = recs[4:]
        sustained = (len(steady) - 1) / (steady[-1]['time'] - steady[0]['time'])
        beside = (alone[-2]['fps'] + alone[-1]['fps']) / 2
        rounds.append({'detector_alone_fps': round(beside, 3), 'stream_fps_sustained': round(sustained, 3), 'stream_fps_overall': s.fps,
                       'ratio': round(sustained / beside, 3), 'frames': s.frames, 'seconds': s.seconds, 'latency_ms': s.latency_ms,
                       'inference_ms': round(s.inference_ms, 2), 'stopped': s.stopped, 'tolerance_s': s.tolerance,
                       'absent_frames': sum(bool(x['absent']) for x in recs),
                       'sources': {m: {k: v for k, v in d.items() if k in ('read', 'used', 'dropped', 'absent', 'state')} for m, d in s.sources.items()}})
    ratio = float(np.median([r['ratio'] for r in rounds]))
    result = {**provenance({'run_dir': str(run_dir) if a.run_dir else None, 'detector': 'the run' if a.run_dir else f'untrained, configs/night_person.yaml architecture, imgsz {imgsz}',
                             'imgsz': predictor.model.imgsz, 'conf': a.conf, 'modalities': predictor.modalities, 'input_fps': fps_in,
                             'input_seconds': a.seconds, 'rounds': a.rounds, 'frame_size': list(next(iter(frames.values()))[0].shape[:2]),
                             'stream': 'three mp4 feeds, capture threads, pairing, JSONL + overlay video written',
                             'detector_alone': 'DetectionPredictor.predict per decoded frame, measured before and after each stream (their mean is its reference)',
                             'sustained': "(records - 1) / (last - first record's pairing time), from the 5th record",
                             'ratio': 'median over rounds of stream sustained FPS / detector-alone FPS'}),
              'detector_alone': alone, 'rounds': rounds, 'ratio': round(ratio, 3), 'goal': {'ratio': 0.8, 'met': bool(ratio >= 0.8)}}
    write_json(result, a.out, indent=1)
    for r in rounds: print(f"detector alone {r['detector_alone_fps']:.2f} FPS, stream sustained {r['stream_fps_sustained']:.2f} FPS ({r['frames']} frames, "
                           f"inputs at {fps_in} fps) -> {r['ratio']:.2f}; latency p50 {r['latency_ms']['p50']:.0f} ms")
    print(f"median ratio {ratio:.2f} (goal 0.8) -> {a.out}")


if __name__ == '__main__': main()
