"""Data-loading throughput of aligned night triplets vs thermal images alone.

Generates the night sample set at 640x512 in a temporary folder, then loads it with the same pipeline
(decode + aligned augmentation + collate) twice: all three modalities, and the thermal modality alone.
Both are timed in this one run, interleaved, and the ratio is printed.

    .venv/bin/python benchmarks/data_throughput.py [--frames 40] [--repeats 3] [--batch 8] [--workers 0]
"""
import argparse, statistics, tempfile, time
from pathlib import Path
import torch
from mmfusion.data import NIGHT_MODALITIES, detection_augment, paired_folders
from mmfusion.sample_data import make_night_data


def samples_per_second(ds, batch, workers):
    loader = ds.loader(batch_size=batch, shuffle=True, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for b in loader: n += len(b['ids'])
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--frames', type=int, default=40, help='frames generated (70/15/15 split; the train split is loaded)')
    p.add_argument('--repeats', type=int, default=3, help='timed passes per pipeline (after one warm-up pass each)')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--workers', type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_night_data(Path(tmp)/'night', n_frames=a.frames, size=(640, 512), seed=0)
        pipelines = {
            'triplet (thermal+nvg+visual_enhanced)': paired_folders(root, 'train', NIGHT_MODALITIES, transform=detection_augment(0)),
            'thermal only': paired_folders(root, 'train', {'thermal': 1}, transform=detection_augment(0, ['thermal'])),
        }
        shape = {m: tuple(x.shape) for m, x in next(iter(pipelines.values()))[0].inputs.items()}
        print(f"night train split: {len(next(iter(pipelines.values())))} frames, shapes {shape}, batch {a.batch}, workers {a.workers}")
        for ds in pipelines.values(): samples_per_second(ds, a.batch, a.workers)  # warm-up (page cache, first-call costs)
        rates = {k: [] for k in pipelines}
        for r in range(a.repeats):
            for k, ds in pipelines.items():
                ds.set_epoch(r)
                rates[k].append(samples_per_second(ds, a.batch, a.workers))
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in rates.items(): print(f"{k:<40} {med[k]:8.1f} samples/s  (runs: {', '.join(f'{x:.1f}' for x in v)})")
        tri, single = med['triplet (thermal+nvg+visual_enhanced)'], med['thermal only']
        print(f"ratio triplet / thermal-only throughput: {tri / single:.2f}  (cost per sample: {single / tri:.2f}x)")


if __name__ == '__main__': main()
