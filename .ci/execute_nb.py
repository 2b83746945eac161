"""Re-execute notebooks in place, top to bottom, in one kernel started in each notebook's folder.

Cells marked `#| slow`, `#| cuda` or `#| eval: false` are not run: they keep the outputs of their last full execution
(`make test-slow` / a GPU session re-runs them), so re-executing the fast path never erases what they showed.
A cell that raises stops the run with the cell's source and error; the notebook is then left unchanged.
Afterwards `nbdev_clean` normalises the file. Usage: `.venv/bin/python .ci/execute_nb.py nbs/06_diagnosis.ipynb [...]`.
"""
import os, re, subprocess, sys, time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

SKIP = re.compile(r'^#\|\s*(slow|cuda|eval:\s*false)\s*$', re.M)

def execute(path:Path, timeout:int=1800) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}})
    t0 = time.time()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code' or SKIP.search(cell.source): continue
            client.execute_cell(cell, i)
    tmp = path.with_name(f'.{path.name}.tmp')
    nbformat.write(nb, tmp); os.replace(tmp, path)  # atomic: an interrupted run leaves the notebook as it was
    return time.time() - t0

if __name__ == '__main__':
    os.environ.pop('MPLBACKEND', None)  # the kernel's inline backend, so figures are saved in the notebook (Agg would keep only their text)
    bin_dir = Path(sys.executable).parent
    for p in sys.argv[1:]:
        p = Path(p).resolve()
        print(f'{p.name}: {execute(p):.0f} s', flush=True)
        subprocess.run([str(bin_dir/'nbdev_clean'), '--fname', str(p)], check=True)
