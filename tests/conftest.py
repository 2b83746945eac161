import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

import pytest, torch


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny models lose more to thread contention than they gain from threads on a 2-core machine"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def browser():
    "A headless Chromium shared by the browser tests (see tests/browser.py)"
    from browser import Browser
    b = Browser()
    yield b
    b.close()
