"""Render nbs/index.ipynb to README.md with nbconvert (nbdev_readme needs Quarto, which is not installable here).

Cells marked `#| hide` are left out and `#|` directive lines are stripped, as nbdev does; outputs are kept as text.
    python .ci/render_readme.py           # write README.md
    python .ci/render_readme.py --check   # exit 1 if README.md is not what index.ipynb renders to
"""
import re, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parent.parent


def render(nb_path=ROOT/'nbs/index.ipynb') -> str:
    nb = nbformat.read(nb_path, as_version=4)
    cells = []
    for c in nb.cells:
        lines = c.source.splitlines()
        if any(re.match(r'#\|\s*hide\s*$', l) for l in lines): continue
        c.source = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
        if c.cell_type == 'code':
            c.outputs = [o for o in c.outputs if o.get('output_type') in ('stream', 'execute_result')]
            for o in c.outputs:
                if 'data' in o: o['data'] = {k: v for k, v in o['data'].items() if k == 'text/plain'}
        if c.source: cells.append(c)
    nb.cells = cells
    body, _ = MarkdownExporter().from_notebook_node(nb)
    note = "<!-- generated from nbs/index.ipynb by .ci/render_readme.py: edit the notebook, then `make readme` -->\n\n"
    return note + re.sub(r'\n{3,}', '\n\n', body).strip() + '\n'


if __name__ == '__main__':
    text, readme = render(), ROOT/'README.md'
    if '--check' in sys.argv:
        if not readme.is_file() or readme.read_text() != text:
            sys.exit("README.md is out of step with nbs/index.ipynb: run `make readme` and commit")
        print("README.md agrees with nbs/index.ipynb")
    else:
        readme.write_text(text); print(f"wrote {readme}")
