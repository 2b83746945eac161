"Notebooks stay pleasant in git: a size budget per notebook and in all, kept by a modest figure DPI and compact figure encoding"
import base64, importlib.util, io, os, struct
from pathlib import Path

import nbformat, numpy as np, pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_MAX, TOTAL_MAX = 400_000, 4_500_000  # bytes on disk, as git stores them. Figures are capped on their own (FIGURES_MAX); the rest is
# sources, text outputs and JSON, which grow with the library (3.1 MB of 4.0 MB in 27 notebooks once segmentation, tuning and the cache landed)
FIGURES_MAX = 1_200_000  # embedded images (base64 image/png + image/jpeg) across every notebook: what made notebooks heavy (2.0 MB at 100 dpi)
_spec = importlib.util.spec_from_file_location('execute_nb', ROOT/'.ci'/'execute_nb.py')
execute_nb = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(execute_nb)


def notebooks() -> list:
    "The project's notebooks, as nbdev finds them (names starting with '.' or '_' are not)"
    return sorted(p for p in (ROOT/'nbs').rglob('*.ipynb') if not any(s.startswith(('.', '_')) for s in p.relative_to(ROOT/'nbs').parts))


def image_bytes(path:Path) -> int:
    "Bytes of base64 image outputs in the notebook at `path`"
    nb = nbformat.read(path, as_version=4)
    return sum(len(v) for c in nb.cells for o in c.get('outputs', []) for k, v in o.get('data', {}).items() if k.startswith('image/'))


def test_each_notebook_within_budget():
    "No notebook over NOTEBOOK_MAX; the message names each with its figures' share, and the fix"
    over = {p.relative_to(ROOT).as_posix(): (p.stat().st_size, image_bytes(p)) for p in notebooks() if p.stat().st_size > NOTEBOOK_MAX}
    assert not over, (f"notebooks over {NOTEBOOK_MAX/1e3:.0f} kB: " +
                      ', '.join(f'{n} {s/1e3:.0f} kB ({i/1e3:.0f} kB figures)' for n, (s, i) in over.items()) +
                      '. Re-execute with `.venv/bin/python .ci/execute_nb.py NOTEBOOK` (modest DPI from nbs/matplotlibrc, '
                      'compact figures); close figures a cell does not mean to show (plt.close), and show fewer of them')


def test_all_notebooks_within_budget():
    total = sum(p.stat().st_size for p in notebooks())
    assert total <= TOTAL_MAX, f"the notebooks hold {total/1e6:.2f} MB in all, over {TOTAL_MAX/1e6:.1f} MB"


def test_all_figures_within_budget():
    "The embedded figures of all notebooks together stay under FIGURES_MAX; the message names the biggest holders"
    figures = sorted(((image_bytes(p), p.relative_to(ROOT).as_posix()) for p in notebooks()), reverse=True)
    total = sum(n for n, _ in figures)
    assert total <= FIGURES_MAX, (f"the notebooks embed {total/1e6:.2f} MB of figures, over {FIGURES_MAX/1e6:.1f} MB; biggest: " +
                                  ', '.join(f'{name} {n/1e3:.0f} kB' for n, name in figures[:5]))


def test_tutorials_share_the_figure_settings():
    "nbs/tutorials/ reads the same matplotlibrc as nbs/ (kernels run in their notebook's folder)"
    assert (ROOT/'nbs'/'tutorials'/'matplotlibrc').read_text() == (ROOT/'nbs'/'matplotlibrc').read_text()
    assert 'figure.dpi: 72' in (ROOT/'nbs'/'matplotlibrc').read_text()


def test_kernel_inline_backend_honours_matplotlibrc(tmp_path, monkeypatch):
    "A Jupyter kernel started in nbs/tutorials/ (as JupyterLab and execute_nb start it) draws inline figures at 72 dpi; elsewhere at matplotlib's 100"
    from nbclient import NotebookClient
    monkeypatch.delenv('MPLBACKEND', raising=False)  # a kernel in JupyterLab has none: the inline backend
    code = "import matplotlib.pyplot as plt\nfig = plt.figure(figsize=(5, 2)); fig.add_axes((0, 0, 1, 1)).plot([0, 1])"
    widths = {}
    for folder in (ROOT/'nbs'/'tutorials', tmp_path):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
        NotebookClient(nb, kernel_name='python3', resources={'metadata': {'path': str(folder)}}).execute()
        png = base64.b64decode(next(o for o in nb.cells[0].outputs if 'image/png' in o.get('data', {}))['data']['image/png'])
        widths[folder.name] = struct.unpack('>II', png[16:24])[0]
    assert abs(widths['tutorials'] / widths[tmp_path.name] - 72 / 100) < 0.01, widths


def _png(array) -> bytes:
    from PIL import Image
    buf = io.BytesIO(); Image.fromarray(array).save(buf, 'png'); return buf.getvalue()


def _decode(raw) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(raw)).convert('RGB'), dtype=np.int16)


def test_compact_image_keeps_plots_exact_and_turns_photos_to_jpeg():
    "A plot-like figure (few colours) is re-encoded exactly; a noisy photo-like one becomes a smaller JPEG close to it; a transparent one is left alone"
    g = np.random.default_rng(0)
    plot = np.full((120, 300, 3), 255, np.uint8); plot[60, :] = (31, 119, 180); plot[:, 150] = (255, 127, 14)
    plot[g.integers(0, 120, 2000), g.integers(0, 300, 2000)] = g.integers(0, 255, (2000, 3))  # noise: far more than the default zlib gains
    mime, raw = execute_nb.compact_image(_png(plot))
    assert mime == 'image/png' and np.array_equal(_decode(raw), plot.astype(np.int16))
    photo = np.clip(g.normal(0, 40, (120, 300, 3)).cumsum(0) / 8 + 128, 0, 255).astype(np.uint8)
    original = _png(photo)
    mime, raw = execute_nb.compact_image(original)
    assert mime == 'image/jpeg' and len(raw) < len(original) / 2
    assert np.abs(_decode(raw) - photo.astype(np.int16)).mean() < 5  # of 255, on noise: JPEG's worst case
    rgba = np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])
    assert execute_nb.compact_image(_png(rgba)) == ('image/png', _png(rgba))
