"""Detection inference latency (not in CI): single-modality YOLO11n against the 3-modality fused YOLO11n, 640x640, batch 1, CPU.

single: ultralytics' own YOLO11n `DetectionModel` on a 1-channel (thermal) frame.
fused:  `MultiModalYOLO` with thermal (1 ch) + NVG (1 ch) + enhanced visible (3 ch): three YOLO11n backbones, a map fusion
        at P3/P4/P5, then the same neck and Detect head; the default fusion (spatial modality attention) and the two cheaper ones.
Each model runs in eval mode under torch.inference_mode (the forward pass, which returns the decoded boxes and scores; NMS
is excluded: with random weights it has nothing to do). Weights are random: latency does not depend on their values.
After 3 warm-up passes each, the models are timed in --runs rounds, one pass of each model per round (so a burst of load
from other processes hits all of them alike); printed: the median and the minimum per model, and their ratios to single.
Run: .venv/bin/python benchmarks/detection_latency.py [--runs 30] [--imgsz 640] [--threads N]
"""
from __future__ import annotations
import argparse, statistics, tempfile, time

import onnxruntime as ort, torch

from mmfusion.data import NIGHT_MODALITIES
from mmfusion.detection import MultiModalYOLO, export_detector
from mmfusion.encoders import load_yolo_model


def latencies(models:dict, runs:int) -> dict:
    "Seconds per forward pass of each model: 3 warm-up passes each, then `runs` rounds of one timed pass per model"
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model, x in models.values():
            for _ in range(3): model(x)
        for _ in range(runs):
            for name, (model, x) in models.items():
                t = time.perf_counter(); model(x); times[name].append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', type=int, default=30)
    p.add_argument('--imgsz', type=int, default=640)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--onnx', action='store_true', help='also time the exported fused model (map_attention) under onnxruntime')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    frames = {m: torch.rand(1, c, a.imgsz, a.imgsz) for m, c in NIGHT_MODALITIES.items()}
    models = {'single YOLO11n (thermal)': (load_yolo_model('yolo11n.yaml', in_channels=1, nc=1).eval(), frames['thermal'])}
    for fusion in ('map_attention', 'map_weighted', 'map_concat'):
        m = MultiModalYOLO(NIGHT_MODALITIES, 'yolo11n.yaml', fusion=fusion, base='thermal').eval()
        models[f"fused 3x YOLO11n, {fusion}"] = (m, frames)
    if a.onnx:
        fused = models['fused 3x YOLO11n, map_attention'][0]
        path = export_detector(fused, tempfile.mkdtemp(), (a.imgsz, a.imgsz), ('onnx',))['onnx']
        options = ort.SessionOptions()
        if a.threads: options.intra_op_num_threads = a.threads
        session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        feed = {**{m: x.numpy() for m, x in frames.items()}, 'present': torch.ones(1, len(frames), dtype=torch.bool).numpy()}
        models['fused, ONNX (onnxruntime)'] = (lambda f: session.run(None, f), feed)
    print(f"inference latency, batch 1, {a.imgsz}x{a.imgsz}, CPU, {torch.get_num_threads()} threads, {a.runs} interleaved rounds")
    times = latencies(models, a.runs)
    base_med, base_min = statistics.median(times[next(iter(times))]), min(times[next(iter(times))])
    for name, t in times.items():
        med, low = statistics.median(t), min(t)
        model = models[name][0]
        params = sum(p.numel() for p in model.parameters()) / 1e6 if isinstance(model, torch.nn.Module) else float('nan')
        print(f"{name:<34} median {med * 1e3:7.1f} ms  min {low * 1e3:7.1f} ms  {params:5.2f} M params  "
              f"ratio {med / base_med:.2f}x (median) {low / base_min:.2f}x (min)")


if __name__ == '__main__':
    main()
