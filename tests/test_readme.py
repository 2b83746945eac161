import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_agrees_with_index_notebook():
    r = subprocess.run([sys.executable, str(ROOT/'.ci/render_readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_readme_carries_the_two_commands():
    text = (ROOT/'README.md').read_text()
    assert 'make demo' in text and 'make test' in text


VERDICTS = ('contributes little', 'contributes', 'ignored', 'inconclusive', 'uninformative')
UNUSED = {'ignored', 'uninformative'}


def weld_readme_claims():
    "Modality -> 'noise' or 'informative', from data/weld/README.md: its table's columns, and its 'carries no class information' sentence"
    text = (ROOT/'data'/'weld'/'README.md').read_text()
    header = next(l for l in text.splitlines() if l.startswith('| class |'))
    mods = [c.strip().split(' (')[0] for c in header.strip('|').split('|')[1:-1]]
    noise = set(re.findall(r'The (\w+) carries no class information', text))
    assert noise and noise <= set(mods), (mods, noise)
    return {m: 'noise' if m in noise else 'informative' for m in mods}


def readme_verdicts():
    "Modality -> verdict, from the quick tour's printed lines in README.md"
    found = dict(re.findall(r'^\s+(\w+)\s+(' + '|'.join(VERDICTS) + r')\s+Shapley share', (ROOT/'README.md').read_text(), re.M))
    assert found, 'the README prints no modality verdicts'
    return found


def test_readme_verdicts_agree_with_what_the_weld_data_carries():
    "The published verdicts: the noise modality (by construction) is reported unused, no informative one is"
    claims, verdicts = weld_readme_claims(), readme_verdicts()
    assert set(verdicts) == set(claims), (verdicts, claims)
    for m, what in claims.items():
        if what == 'noise': assert verdicts[m] in UNUSED, (m, verdicts[m])
        else: assert verdicts[m] not in UNUSED, (m, verdicts[m])
    assert verdicts['images'] == verdicts['sensors'] == 'contributes'  # the two the weld README's table leans on most
