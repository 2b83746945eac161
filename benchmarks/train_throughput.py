"""Training throughput on the CPU: the library's `Learner` vs a plain hand-written PyTorch loop, weld config.

Both train the same model (configs/weld.yaml) on the same cached weld training split with the same batches, optimizer,
per-step cosine schedule, gradient clipping, modality dropout and loss; the Learner runs with the callbacks `train`
uses (device, NaN guard, schedule, clipping, modality dropout) minus files and progress output. Each timed pass is one
epoch; passes alternate between the two so that machine load hits both alike, and the median is reported.

    .venv/bin/python benchmarks/train_throughput.py [--epochs 3] [--repeats 3] [--threads 0]
"""
import argparse, math, statistics, time
import torch
from mmfusion.fusion import drop_modalities
from mmfusion.model import build_model
from mmfusion.core import seed_everything
from mmfusion.training import Learner, ModelLoss, OPTIMIZERS, make_train_loader, training_callbacks
from mmfusion.config import apply_overrides, build_splits, fit_config_to_data, load_config, resolve_config


def setup(cfg, splits):
    "A fresh model, loss and training loader, seeded"
    seed_everything(cfg['seed'])
    model = build_model(cfg['model'])
    return model, ModelLoss(cfg['loss'], model.aux_weight), make_train_loader(splits[cfg['data']['train']], cfg['data'], cfg['seed'])


def learner_epochs(cfg, splits, epochs):
    "Samples/s of `Learner.fit` with the callbacks `train` uses (no files, no progress output)"
    model, loss_func, dl = setup(cfg, splits)
    t = cfg['training']
    learn = Learner(model, dl, None, loss_func, t['lr'], OPTIMIZERS[t['optimizer']], t['weight_decay'], t['lr_mult'],
                    cbs=training_callbacks(cfg, run_dir=None))
    t0 = time.perf_counter()
    learn.fit(epochs)
    return epochs * len(dl.dataset) / (time.perf_counter() - t0)


def plain_epochs(cfg, splits, epochs):
    "Samples/s of the same training written by hand"
    model, loss_func, dl = setup(cfg, splits)
    t = cfg['training']
    opt = torch.optim.AdamW(model.param_groups(t['lr'], t['lr_mult'], t['weight_decay']), lr=t['lr'])
    s = t['schedule']
    total, warm = epochs * len(dl), round(s['warmup_epochs'] * len(dl))
    def factor(i):
        if i < warm: return s['start_factor'] + (1 - s['start_factor']) * i / warm
        return s['min_factor'] + (1 - s['min_factor']) * 0.5 * (1 + math.cos(math.pi * min(1, (i - warm) / max(1, total - warm))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    t0, losses = time.perf_counter(), []
    for epoch in range(epochs):
        dl.batch_sampler.set_epoch(epoch)
        for batch in dl:
            batch['present'] = drop_modalities(batch['present'], t['modality_dropout'])
            loss = loss_func(model(batch), batch)
            if not torch.isfinite(loss): raise RuntimeError('non-finite loss')
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t['clip'])
            opt.step(); opt.zero_grad(set_to_none=True); sched.step()
            losses.append(loss.item())
    return epochs * len(dl.dataset) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/weld.yaml')
    p.add_argument('--root', default='data')
    p.add_argument('--epochs', type=int, default=2, help='epochs per timed pass')
    p.add_argument('--repeats', type=int, default=3, help='timed passes per loop (after one warm-up pass each)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    cfg = resolve_config(apply_overrides(load_config(a.config), [f'data.root={a.root}', 'training.progress=false', 'training.device=cpu']))
    splits = build_splits(cfg['data'], cfg['seed'])
    cfg = fit_config_to_data(cfg, splits)
    train_ds = splits[cfg['data']['train']]
    for i in range(len(train_ds)): train_ds[i]  # decode every sample once (cached), so neither loop pays for file reading
    print(f"{a.config}: {len(train_ds)} training samples, batch {cfg['data']['batch_size']}, modalities {list(train_ds.modalities)}, "
          f"torch threads {torch.get_num_threads()}, {a.epochs} epoch(s) per pass")
    learner_epochs(cfg, splits, 1); plain_epochs(cfg, splits, 1)  # warm-up
    rates = {'Learner': [], 'plain loop': []}
    for _ in range(a.repeats):
        rates['Learner'].append(learner_epochs(cfg, splits, a.epochs))
        rates['plain loop'].append(plain_epochs(cfg, splits, a.epochs))
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items(): print(f"{k:<12} {med[k]:7.1f} samples/s  (passes: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"ratio Learner / plain loop: {med['Learner'] / med['plain loop']:.3f}")


if __name__ == '__main__': main()
