import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_agrees_with_index_notebook():
    r = subprocess.run([sys.executable, str(ROOT/'.ci/render_readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_readme_carries_the_two_commands():
    text = (ROOT/'README.md').read_text()
    assert 'make demo' in text and 'make test' in text
