"""Build the documentation site into _docs/ (`make docs`).

With `quarto` on PATH this is nbdev's own pipeline, `nbdev_docs`. Without it (Quarto has no wheel and is not packaged
here) the same pages are built: nbdev's notebook processors prepare every notebook in nbs/ as `nbdev_docs` would
(hidden and exported cells dropped, directives stripped, symbol names linked), leaving out only the re-execution of
show_doc cells, whose saved outputs already hold the API documentation; then mkdocs-material with mkdocs-jupyter renders
them (docs/mkdocs.yml), with a navigation taken from nbs/sidebar.yml, which nbdev generates.
    python .ci/build_docs.py            # build _docs/
"""
import re, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_PROCS = {'FrontmatterProc', 'add_show_docs', 'exec_show_docs', 'add_fold', 'mv_exports'}  # execution / Quarto-only markup
_echo_false, _output_false = re.compile(r'^#\|\s*echo:\s*false', re.M), re.compile(r'^#\|\s*output:\s*false', re.M)
_pandoc_attrs = re.compile(r'\)\{target="_blank"[^}]*\}')  # `[source](url){target=...}`: Pandoc link attributes
_dotted_anchor = re.compile(r'(\.html#)([\w.-]+)')  # nbdev links methods as page.html#class.method; the page's id drops the dot


def quarto_available() -> bool: return shutil.which('quarto') is not None


def sidebar_nav(sidebar:Path) -> list:
    "mkdocs `nav` from nbdev's sidebar.yml: each notebook becomes its rendered page, each folder a section"
    import yaml
    def page(f): return re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(f).name.lower()).rsplit('.', 1)[0]
    def entry(item, folder=''):
        if isinstance(item, str): return f"{folder}{page(item)}.ipynb"
        name = item['section']
        return {name.replace('_', ' ').capitalize(): [entry(i, f"{folder}{name}/") for i in item['contents']]}
    return [entry(i) for i in yaml.safe_load(sidebar.read_text())['website']['sidebar']['contents']]


def process_notebooks(nbs:Path, out:Path) -> list:
    "nbdev's docs processors on every notebook, written under `out` with nbdev's page names (00_data.ipynb -> data.ipynb)"
    from execnb.nbio import read_nb, write_nb
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults
    cfg = get_config()
    site = f"{cfg.doc_host.rstrip('/')}{cfg.doc_baseurl.rstrip('/')}/"
    procs = [p for p in FilterDefaults().procs() if p.__name__ not in SKIP_PROCS]
    shutil.rmtree(out, ignore_errors=True)
    written = []
    for f in nbglob(nbs, func=Path, file_re=r'\.ipynb$'):
        rel = f.relative_to(nbs)
        dest = out/rel.parent/(re.sub(r'^\d+[a-zA-Z0-9]*_', '', rel.stem.lower()) + '.ipynb')
        nb = read_nb(f)
        NBProcessor(f, procs, nb=nb).process()
        nb.cells = [c for c in nb.cells if c.get('source')]
        for i, c in enumerate(nb.cells): c.setdefault('id', f'proc-{i}')  # cells nbdev inserts have none
        up = '../' * (len(rel.parts) - 1)
        own = lambda text: _dotted_anchor.sub(lambda m: m.group(1) + m.group(2).replace('.', ''), text.replace(site, up))
        for c in nb.cells:  # links to this site's own pages stay on this site (relative), as Quarto's would
            c.source = own(c.source)
            if c.cell_type == 'code':  # Quarto cell options: `echo: false` hides the code, `output: false` the output
                if _echo_false.search(c.source): c.setdefault('metadata', {}).setdefault('tags', []).append('remove_input')
                if _output_false.search(c.source): c['outputs'] = []
                c.source = '\n'.join(l for l in c.source.splitlines() if not l.startswith('#|')).strip()
            for o in c.get('outputs', []):
                md = o.get('data', {}).get('text/markdown')
                if md is not None:
                    md = ''.join(md) if isinstance(md, list) else md
                    o['data']['text/markdown'] = _pandoc_attrs.sub(')', own(md))
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_nb(nb, dest)
        written.append(dest)
    return written


def toc_markdown(path) -> str:
    "A notebook's markdown cells, as mkdocs-jupyter reads them for the page's table of contents, with inline code kept as text"
    import json
    cells = json.loads(Path(path).read_text(encoding='utf-8'))['cells']
    body = '\n\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
    return re.sub(r'`([^`\n]*)`', r'\1', re.sub(r'```.*?```', '', body, flags=re.DOTALL))


def build_mkdocs(out:Path=ROOT/'_docs', proc:Path=ROOT/'_proc'/'mkdocs', cache:Path=ROOT/'_proc'/'mkdocs-jupyter-cache-2') -> Path:
    "The fallback: nbdev-processed notebooks (written to `proc`) rendered by mkdocs-material + mkdocs-jupyter into `out`"
    import mkdocs_jupyter.plugin
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from nbdev.quarto import nbdev_sidebar
    # mkdocs-jupyter drops inline code from headings for its table of contents ('Callbacks and the `Learner`' -> #callbacks-and-the),
    # while the heading's id keeps it (#callbacks-and-the-learner): its TOC links went nowhere. Same markdown, code kept as text:
    mkdocs_jupyter.plugin.convert.nb2md = toc_markdown
    nbs = ROOT/'nbs'
    nbdev_sidebar.__wrapped__(path=nbs)  # nbdev regenerates it (settings.ini: custom_sidebar = False), as nbdev_docs does
    process_notebooks(nbs, proc)
    cfg = load_config(str(ROOT/'docs'/'mkdocs.yml'), docs_dir=str(proc), site_dir=str(out),
                      nav=sidebar_nav(nbs/'sidebar.yml'))
    cfg.plugins['mkdocs-jupyter'].config['cache_dir'] = str(cache)  # keyed on content: unchanged pages are not re-rendered
    build(cfg)
    return out


def main():
    t0 = time.time()
    if quarto_available():
        subprocess.run([str(Path(sys.executable).parent/'nbdev_docs')], cwd=ROOT, check=True)
        # nbdev_docs also re-renders README.md through Quarto; the project's README is render_readme.py's (tests/test_readme.py)
        subprocess.run([sys.executable, str(ROOT/'.ci'/'render_readme.py')], cwd=ROOT, check=True)
        out = ROOT/'_docs'
    else: out = build_mkdocs()
    print(f"docs site in {out} ({'Quarto' if quarto_available() else 'mkdocs'}, {time.time() - t0:.0f} s)")


if __name__ == '__main__': main()
