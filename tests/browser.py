"Headless Chromium for the tests: serve a folder on loopback, open pages, collect console errors, save screenshots."
import functools, http.server, os, shutil, threading
from contextlib import contextmanager
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent.parent/'test-artifacts'  # screenshots land here (gitignored)
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync']  # the closed network refuses Chromium's background calls

def chromium_path() -> str:
    "Debian's chromium (installed by `make browser`, part of `make test`)"
    path = os.environ.get('CHROMIUM') or shutil.which('chromium') or shutil.which('chromium-browser')
    if not path: raise RuntimeError("headless Chromium not found: run `make browser` (apt-get install chromium) or set CHROMIUM=/path/to/chromium")
    return path

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

@contextmanager
def serve(folder):
    "Serve `folder` over HTTP on 127.0.0.1 (a free port); yields the base URL"
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(folder)))
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    try: yield f'http://127.0.0.1:{srv.server_port}'
    finally: srv.shutdown(); srv.server_close()

class Browser:
    "One headless Chromium; `open(url, shot)` loads a page, saves a full-page screenshot and returns (page text, console errors)"
    def __init__(self):
        from playwright.sync_api import sync_playwright
        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
    def open(self, url:str, screenshot:str, wait:str='load') -> tuple:
        page = self._browser.new_page(viewport={'width': 1280, 'height': 900})
        errors = []
        page.on('console', lambda m: errors.append(m.text) if m.type == 'error' else None)
        page.on('pageerror', lambda e: errors.append(str(e)))
        page.route('**/favicon.ico', lambda r: r.fulfill(status=204, body=''))
        page.goto(url, wait_until=wait)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS/screenshot), full_page=True)
        text = page.inner_text('body')
        page.close()
        return text, errors
    def new_page(self, **kw):
        "A new page (Playwright's) in this browser, for tests that drive a page themselves"
        return self._browser.new_page(**kw)
    def close(self): self._browser.close(); self._pw.stop()

def image_status(browser:Browser, url:str) -> list:
    "(alt, loaded) for every <img> of the page at `url`; loaded: decoded, with a non-zero natural width"
    page = browser._browser.new_page()
    try:
        page.goto(url, wait_until='load')
        return page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    finally: page.close()
