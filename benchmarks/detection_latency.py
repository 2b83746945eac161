"""Detection inference latency (not in CI): single-modality YOLO11n against the 3-modality fused YOLO11n, 640x640, batch 1, CPU.

single: ultralytics' own YOLO11n `DetectionModel` on a 1-channel (thermal) frame.
fused:  `MultiModalYOLO` with thermal (1 ch) + NVG (1 ch) + enhanced visible (3 ch): three YOLO11n backbones, a map fusion
        at P3/P4/P5 (base = thermal), then the same neck and Detect head: the default fusion (`map_lean`), and with
        --fusions also map_attention / map_weighted / map_concat.
onnx:   the fused model with the default fusion exported by `export_detector` (dynamic batch, NMS outside the graph) and run by
        onnxruntime (CPUExecutionProvider, intra-op threads = --threads), next to PyTorch.
Each model runs in eval mode under torch.inference_mode (the forward pass, which returns the decoded boxes and scores; NMS
is excluded: with random weights it has nothing to do). Weights are random: latency does not depend on their values.
After 3 warm-up passes each, the models are timed in --runs rounds, one pass of each model per round (so a burst of load
from other processes hits all of them alike): the median and the minimum per model, their ratios to single, and the
paired ratio per round (this model's pass over the single model's pass in the same round: median and 2.5/97.5 percentiles).
On a busy machine use --threads 1 (torch and onnxruntime alike): two threads of each engine wait for each other.
Goal (issue 17): fused with the default fusion <= 2.5x single. Writes benchmarks/results/detection_latency.json (date,
commit, machine, recipe).
Run: .venv/bin/python benchmarks/detection_latency.py [--runs 30] [--imgsz 640] [--threads 2] [--fusions map_attention map_weighted]
     [--device cuda]
"""
from __future__ import annotations
import argparse, statistics, tempfile, time

import numpy as np, onnxruntime as ort, torch

from mmfusion.data import NIGHT_MODALITIES
from mmfusion.detection import MultiModalYOLO, export_detector
from mmfusion.encoders import load_yolo_model
from mmfusion.core import write_json
from provenance import provenance

SINGLE, DEFAULT, ONNX = 'single YOLO11n (thermal)', 'fused 3x YOLO11n, map_lean (default)', 'fused 3x YOLO11n, map_lean, ONNX (onnxruntime)'


def latencies(models:dict, runs:int, sync=lambda: None) -> dict:
    "Seconds per forward pass of each model: 3 warm-up passes each, then `runs` rounds of one timed pass per model"
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model, x in models.values():
            for _ in range(3): model(x)
        sync()
        for _ in range(runs):
            for name, (model, x) in models.items():
                t = time.perf_counter(); model(x); sync(); times[name].append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', type=int, default=30)
    p.add_argument('--imgsz', type=int, default=640)
    p.add_argument('--threads', type=int, default=2, help='torch (and onnxruntime intra-op) threads; 0: the library default')
    p.add_argument('--fusions', nargs='*', default=[], help='other map fusions to time too (map_attention, map_weighted, map_concat)')
    p.add_argument('--no-onnx', action='store_true', help='skip the onnxruntime timing')
    p.add_argument('--device', default='cpu', help="'cuda' times the PyTorch models on the GPU (onnxruntime stays on the CPU)")
    p.add_argument('--out', default='benchmarks/results/detection_latency.json')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    frames = {m: torch.rand(1, c, a.imgsz, a.imgsz) for m, c in NIGHT_MODALITIES.items()}
    on_dev = {m: x.to(dev) for m, x in frames.items()}
    models = {SINGLE: (load_yolo_model('yolo11n.yaml', in_channels=1, nc=1).eval().to(dev), on_dev['thermal'])}
    fused = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', base='thermal').eval()
    models[DEFAULT] = (fused.to(dev), on_dev)
    for fusion in a.fusions:
        models[f"fused 3x YOLO11n, {fusion}"] = (MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', fusion=fusion, base='thermal').eval().to(dev), on_dev)
    export = None
    if not a.no_onnx:
        t = time.perf_counter()
        res = export_detector(fused.cpu(), tempfile.mkdtemp(), (a.imgsz, a.imgsz), ('onnx',))['onnx']
        fused.to(dev)
        export = {'seconds': round(time.perf_counter() - t, 1), 'max_abs_diff': res['max_abs_diff']}
        options = ort.SessionOptions()
        if a.threads: options.intra_op_num_threads, options.inter_op_num_threads = a.threads, 1
        session = ort.InferenceSession(str(res['path']), options, providers=['CPUExecutionProvider'])
        feed = {**{m: x.numpy() for m, x in frames.items()}, 'present': torch.ones(1, len(frames), dtype=torch.bool).numpy()}
        models[ONNX] = (lambda f: session.run(None, f), feed)
    print(f"inference latency, batch 1, {a.imgsz}x{a.imgsz}, {a.device}, {torch.get_num_threads()} threads, {a.runs} interleaved rounds")
    times = latencies(models, a.runs, sync)
    base_med, base_min = statistics.median(times[SINGLE]), min(times[SINGLE])
    rows = {}
    for name, t in times.items():
        med, low = statistics.median(t), min(t)
        model = models[name][0]
        params = sum(p.numel() for p in model.parameters()) / 1e6 if isinstance(model, torch.nn.Module) else None
        paired = np.array(t) / np.array(times[SINGLE])  # round by round: this model's pass over the single model's pass of the same round
        rows[name] = {'median_ms': med * 1e3, 'min_ms': low * 1e3, 'params_m': params, 'ratio_median': med / base_med, 'ratio_min': low / base_min,
                      'paired_ratio': {'median': float(np.median(paired)), 'p2.5': float(np.percentile(paired, 2.5)), 'p97.5': float(np.percentile(paired, 97.5))}}
        print(f"{name:<48} median {med * 1e3:7.1f} ms  min {low * 1e3:7.1f} ms  " + (f"{params:5.2f} M params  " if params else ' ' * 16) +
              f"ratio {med / base_med:.2f}x (median) {low / base_min:.2f}x (min)")
    goal = {'fused_default_at_most_2.5x_single': rows[DEFAULT]['ratio_median'] <= 2.5,
            'paired_ratio_p97.5_at_most_2.5': rows[DEFAULT]['paired_ratio']['p97.5'] <= 2.5}
    recipe = {'imgsz': a.imgsz, 'batch': 1, 'runs': a.runs, 'threads': a.threads, 'device': a.device, 'modalities': dict(NIGHT_MODALITIES),
              'model': 'yolo11n.yaml (random weights)', 'base': 'thermal', 'fusions': ['map_lean', *a.fusions], 'nms': 'excluded',
              'onnx': None if a.no_onnx else 'export_detector, opset 17, onnxruntime CPUExecutionProvider'}
    write_json({**provenance(recipe), 'latency': rows, 'export': export, 'goals': goal}, a.out)
    print(f"goals: {goal}; wrote {a.out}")


if __name__ == '__main__':
    main()
