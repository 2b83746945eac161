"""The notebooks work in JupyterLab: `jupyter lab` headless on a free loopback port, notebooks run through its UI in Chromium.

Each notebook is opened from its place in nbs/ (its kernel starts in its folder, so relative data paths resolve), run with
the menu Run > Run All Cells, and checked once the kernel is idle: every code cell ran, none shows an error, a known output
is on screen. Screenshots go to test-artifacts/. Autosave is off and the server is shut down without saving, so the
notebooks on disk stay as they were (checked). Needs `make install-dev` (JupyterLab, the `mmfusion` kernel) and Chromium.
"""
import hashlib, json, os, re, secrets, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path

import pytest

from browser import ARTIFACTS

ROOT = Path(__file__).resolve().parent.parent
KERNEL = 'mmfusion'
NOTEBOOKS = {  # notebook -> an output its last cells print (a shape), which only a complete run shows
    'nbs/02_fusion.ipynb': "torch.Size([12, 16])",
    'nbs/tutorials/05_bring_your_own_data.ipynb': "'without vision'",
}
SETTINGS = {  # JupyterLab user settings for the test: nothing written back to the notebooks, every cell in the page, no network
    '@jupyterlab/docmanager-extension/plugin': {'autosave': False},
    '@jupyterlab/notebook-extension/tracker': {'windowingMode': 'none'},
    '@jupyterlab/apputils-extension/notification': {'fetchNews': 'false', 'checkForUpdates': False},
}


def test_notebooks_use_the_project_kernel():
    "Every notebook names the kernel `make lab` registers, so JupyterLab starts it without asking (.ci/set_kernelspec.py sets it)"
    r = subprocess.run([sys.executable, str(ROOT/'.ci'/'set_kernelspec.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _get(url:str, timeout:float=5) -> int:
    "HTTP status of a GET (0 if nothing answers)"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r: return r.status
    except urllib.error.HTTPError as e: return e.code
    except OSError: return 0


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    "A JupyterLab server over the repository (loopback, token), with its own settings, runtime and checkpoint folders; shut down after"
    exe = Path(sys.executable).parent/'jupyter-lab'
    if not exe.exists(): pytest.fail(f"JupyterLab is not installed in {sys.prefix}: run `make install-dev` (or `make lab`)")
    tmp = tmp_path_factory.mktemp('lab')
    for plugin, values in SETTINGS.items():
        f = tmp/'settings'/f'{plugin}.jupyterlab-settings'; f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**{k: v for k, v in os.environ.items() if k != 'MPLBACKEND'},  # kernels draw with the inline backend, as for a user
           'JUPYTER_CONFIG_DIR': str(tmp/'config'), 'JUPYTER_RUNTIME_DIR': str(tmp/'runtime'),
           'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'YOLO_OFFLINE': '1'}
    cmd = [str(exe), '--no-browser', '--ip=127.0.0.1', f'--port={port}', '--ServerApp.port_retries=0',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT}', '--LabApp.expose_app_in_browser=True',
           f'--LabApp.user_settings_dir={tmp/"settings"}', f'--LabApp.workspaces_dir={tmp/"workspaces"}',
           f'--FileCheckpoints.root_dir={tmp/"checkpoints"}', *(['--allow-root'] if os.geteuid() == 0 else [])]
    log = open(tmp/'server.log', 'w')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    deadline = time.time() + 90
    while _get(f'{url}/api/status?token={token}') != 200:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill(); pytest.fail(f"jupyter lab did not start:\n{(tmp/'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {'url': url, 'token': token}
    req = urllib.request.Request(f'{url}/api/shutdown?token={token}', method='POST')
    try: urllib.request.urlopen(req, timeout=10).close()
    except OSError: pass
    try: code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired: proc.kill(); code = 'killed after 60 s'
    log.close()
    assert code == 0, f"jupyter lab did not shut down cleanly ({code}):\n{(tmp/'server.log').read_text()[-3000:]}"


_READY = """name => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!(k && w.context.isReady && w.context.path.endsWith(name) && k.status === 'idle'); }"""
_CELLS = """() => { const w = window.jupyterapp.shell.currentWidget, cells = w.content.model.cells;
  return Array.from({length: cells.length}, (_, i) => cells.get(i)).filter(c => c.type === 'code')
    .map(c => ({count: c.executionCount, running: c.executionState === 'running', outputs: c.outputs.toJSON()})); }"""
_KERNEL = """() => { const w = window.jupyterapp.shell.currentWidget;
  return [w.sessionContext.session.kernel.name, w.context.model.getMetadata('kernelspec').name, w.sessionContext.session.kernel.status]; }"""


def _run_all(page, timeout:float=600) -> list:
    "Run > Run All Cells from the menu bar, then wait until the kernel is idle with no cell running or queued (stable for 2 s)"
    page.locator('#jp-MainMenu .lm-MenuBar-itemLabel', has_text=re.compile(r'^Run$')).click()
    page.locator('.lm-Menu-itemLabel', has_text=re.compile(r'^Run All Cells$')).click()
    deadline, settled = time.time() + timeout, None
    while time.time() < deadline:
        cells, status = page.evaluate(_CELLS), page.evaluate(_KERNEL)[2]
        done = status == 'idle' and not any(c['running'] for c in cells)
        if done and settled and time.time() - settled > 2: return cells
        settled = (settled or time.time()) if done else None
        time.sleep(0.5)
    raise TimeoutError(f"the notebook was still running after {timeout} s")


def _text(outputs:list) -> str:
    return '\n'.join(''.join(o.get('text', '')) + ''.join(o.get('data', {}).get('text/plain', '')) for o in outputs)


def _errors(cells:list) -> list:
    "(code cell, ename, evalue) of every error output"
    return [(i, o.get('ename'), o.get('evalue')) for i, c in enumerate(cells) for o in c['outputs'] if o['output_type'] == 'error']


def _open_and_run(lab, browser, notebook:str, screenshot:str, shown:str):
    "Open `notebook` (a path under the repository) in JupyterLab, Run All Cells, screenshot the output showing `shown`; returns (kernel, kernelspec, cells)"
    page = browser.new_page(viewport={'width': 1280, 'height': 1400})
    try:
        page.goto(f"{lab['url']}/lab/tree/{notebook}?token={lab['token']}")
        page.wait_for_function(_READY, arg=Path(notebook).name, timeout=120_000)
        kernel, kernelspec, _ = page.evaluate(_KERNEL)
        cells = _run_all(page)
        out = page.locator('.jp-OutputArea-output', has_text=shown).last
        if out.count(): out.scroll_into_view_if_needed()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS/screenshot))
        return kernel, kernelspec, cells, out.count() > 0 and out.is_visible()
    finally: page.close()


@pytest.mark.parametrize('notebook', NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(lab, browser, notebook):
    "Open the notebook in JupyterLab, Run All Cells from the menu: every code cell ran, no error output, the known output is shown"
    path, expected = ROOT/notebook, NOTEBOOKS[notebook]
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    kernel, kernelspec, cells, visible = _open_and_run(lab, browser, notebook, f'lab_{path.stem}.png', expected)
    assert kernel == kernelspec, f"JupyterLab started kernel {kernel!r}, the notebook names {kernelspec!r}"
    assert _errors(cells) == [], f"{notebook}: error outputs (code cell, ename, evalue): {_errors(cells)}"
    not_run = [i for i, c in enumerate(cells) if c['count'] is None]
    assert not_run == [], f"{notebook}: code cells that did not run: {not_run}"
    assert expected in _text(o for c in cells for o in c['outputs']), f"{notebook}: no output shows {expected!r}"
    assert visible, f"{notebook}: the output {expected!r} is not on screen"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, f"{notebook} was modified on disk by the JupyterLab run"


def test_a_failing_cell_is_seen(lab, browser):
    "The checks above can fail: a notebook whose second cell raises shows that error, and Run All leaves the third cell unrun"
    import nbformat
    folder = ARTIFACTS/'lab_planted'; folder.mkdir(parents=True, exist_ok=True)  # under the server's root; test-artifacts/ is ignored by git
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in ('print(1)', '1/0', 'print(2)')],
                                  metadata={'kernelspec': {'name': KERNEL, 'display_name': KERNEL, 'language': 'python'}})
    nbformat.write(nb, folder/'planted.ipynb')
    _, _, cells, visible = _open_and_run(lab, browser, 'test-artifacts/lab_planted/planted.ipynb', 'lab_planted.png', 'ZeroDivisionError')
    assert _errors(cells) == [(1, 'ZeroDivisionError', 'division by zero')], cells
    assert [i for i, c in enumerate(cells) if c['count'] is None] == [2] and visible


def test_server_wants_the_token(lab):
    "The server listens on loopback only behind its token: the API refuses a request without it"
    assert _get(f"{lab['url']}/api/contents/nbs?token={lab['token']}") == 200
    assert _get(f"{lab['url']}/api/contents/nbs") == 403
