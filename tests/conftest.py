import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

import pytest, torch


SPREAD = {'test_planted_truth.py'}  # files whose tests share no fixture: dealt out to the workers one test at a time


def pytest_configure(config):
    config.addinivalue_line('markers', "slow: a heavy end-to-end check run by `make test-slow`, not `make test` (deselected there with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    "For `pytest -n 2 --dist loadgroup` (make test): a file's tests share a worker, so its module fixtures are built once; SPREAD's are balanced"
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.nodeid if item.path.name in SPREAD else item.path.name))


def json_numbers(obj) -> list:
    "Every number in a parsed JSON document (bools excluded), for finiteness checks of written reports"
    if isinstance(obj, dict): return [x for v in obj.values() for x in json_numbers(v)]
    if isinstance(obj, list): return [x for v in obj for x in json_numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny models lose more to thread contention than they gain from threads on a 2-core machine"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def browser():
    "A headless Chromium for one test module (see tests/browser.py); closed after it, since Playwright's sync API keeps an asyncio loop running meanwhile"
    from browser import Browser
    b = Browser()
    yield b
    b.close()
