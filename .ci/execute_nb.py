"""Re-execute notebooks in place, top to bottom, in one kernel started in each notebook's folder.

Cells marked `#| slow`, `#| cuda` or `#| eval: false` are not run: they keep the outputs of their last full execution
(`make test-slow` / a GPU session re-runs them), so re-executing the fast path never erases what they showed.
`--slow` runs the `#| slow` cells too and saves what they show (`#| cuda` ones still need a GPU session).
A cell that raises stops the run with the cell's source and error; the notebook is then left unchanged.
Figures: the kernel reads nbs/matplotlibrc (or nbs/tutorials/matplotlibrc), as JupyterLab's does, for a modest DPI;
each saved PNG is then stored compactly (`compact_image`), so notebooks stay within tests/test_notebook_size.py's budget.
Afterwards `nbdev_clean` normalises the file. Usage: `.venv/bin/python .ci/execute_nb.py nbs/06_diagnosis.ipynb [...]`;
`--slow` as above; `--compact-only` re-encodes the saved figures of already executed notebooks without running them.
"""
import base64, io, os, re, subprocess, sys, time
from pathlib import Path

import nbformat

SKIP = re.compile(r'^#\|\s*(slow|cuda|eval:\s*false)\s*$', re.M)
SKIP_WITH_SLOW = re.compile(r'^#\|\s*(cuda|eval:\s*false)\s*$', re.M)
KERNEL = 'mmfusion'  # the kernel `make lab` registers (.ci/set_kernelspec.py); the venv's own python3 kernel where it is not
PALETTE_MAX_ERR = 0.5  # mean abs. error (of 255) a 256-colour palette may add: plots qualify, photo-like panels do not
JPEG_GAIN = 0.5        # photo-like panels become JPEG (quality 85, no chroma subsampling) only when that halves them


def compact_image(png:bytes) -> tuple:
    "(mime type, bytes) of the smallest faithful encoding of an opaque figure saved as `png`; unchanged if nothing is smaller"
    from PIL import Image
    import numpy as np
    im = Image.open(io.BytesIO(png))
    if im.mode in ('RGBA', 'LA', 'P') and np.asarray(im.convert('RGBA'))[..., 3].min() < 255: return 'image/png', png
    rgb = im.convert('RGB')
    pal = rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)  # exact when it has <= 256 colours
    err = np.abs(np.asarray(pal.convert('RGB'), dtype=np.int16) - np.asarray(rgb, dtype=np.int16)).mean()
    buf = io.BytesIO()
    if err <= PALETTE_MAX_ERR: pal.save(buf, 'png', optimize=True); mime, limit = 'image/png', len(png)
    else: rgb.save(buf, 'jpeg', quality=85, subsampling=0, optimize=True); mime, limit = 'image/jpeg', JPEG_GAIN * len(png)
    return (mime, buf.getvalue()) if len(buf.getvalue()) < limit else ('image/png', png)


def compact_outputs(nb) -> int:
    "Replace every PNG output of `nb` by `compact_image`'s encoding; returns the bytes saved (base64)"
    saved = 0
    for cell in nb.cells:
        for out in cell.get('outputs', []):
            data = out.get('data', {})
            if 'image/png' not in data: continue
            b64 = ''.join(data['image/png']) if isinstance(data['image/png'], list) else data['image/png']
            mime, raw = compact_image(base64.b64decode(b64))
            new = base64.b64encode(raw).decode()
            if mime == 'image/png' and new == b64.replace('\n', ''): continue
            del data['image/png']; data[mime] = new
            saved += len(b64) - len(new)
    return saved


def kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager
    return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else 'python3'


def execute(path:Path, timeout:int=1800, skip=SKIP) -> float:
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name(), resources={'metadata': {'path': str(path.parent)}})
    t0 = time.time()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code' or skip.search(cell.source): continue
            client.execute_cell(cell, i)
    compact_outputs(nb)
    write(nb, path)
    return time.time() - t0


def write(nb, path:Path):
    tmp = path.with_name(f'.{path.name}.tmp')
    nbformat.write(nb, tmp); os.replace(tmp, path)  # atomic: an interrupted run leaves the notebook as it was


if __name__ == '__main__':
    os.environ.pop('MPLBACKEND', None)  # the kernel's inline backend, so figures are saved in the notebook (Agg would keep only their text)
    bin_dir = Path(sys.executable).parent
    compact_only, skip = '--compact-only' in sys.argv, SKIP_WITH_SLOW if '--slow' in sys.argv else SKIP
    for p in [Path(a).resolve() for a in sys.argv[1:] if a not in ('--compact-only', '--slow')]:
        size = p.stat().st_size
        if compact_only:
            nb = nbformat.read(p, as_version=4); compact_outputs(nb); write(nb, p)
        else: print(f'{p.name}: {execute(p, skip=skip):.0f} s', end=', ', flush=True)
        subprocess.run([str(bin_dir/'nbdev_clean'), '--fname', str(p)], check=True)
        print(f'{p.name}: {size/1e3:.0f} kB -> {p.stat().st_size/1e3:.0f} kB', flush=True)
