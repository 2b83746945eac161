"""The architecture checks of issue 14, computed from the sources (only the last test imports mmfusion, in a subprocess).

- the import graph of `mmfusion/` (imports inside functions and `importlib.import_module('mmfusion.x')` included) has no cycle,
  and every edge goes to the same or a lower floor;
- no module imports a `_private` name from another mmfusion module;
- the kind of a run is decided in one function (`config.run_kind`): the old key-sniffing patterns appear nowhere else;
- no exported notebook cell is longer than 80 lines.
"""
import ast, json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB, NBS = ROOT/'mmfusion', ROOT/'nbs'

# lower floors may not import higher ones (RULES.md / issue 14):
# core → data → encoders → fusion → model → training/config → evaluation → diagnosis → detection/kinds/planted → deploy → serve → runs → cli
FLOORS = {'core':0, 'data':1, 'sample_data':1, 'encoders':2, 'fusion':3, 'model':4, 'training':5, 'config':5, 'evaluation':6,
          'diagnosis':7, 'detection':8, 'kinds':8, 'planted':8, 'deploy':9, 'serve':10, 'runs':11, 'cli':13,
          'segmentation':8, 'embed':8, 'stream':10, 'tune':12}  # new this session: segmentation (07b), embed (07c), stream (10a), tune (12)
DYNAMIC_OK = FLOORS['runs']  # from this floor up a module may import by computed names (runs discovers every module)
MAX_EXPORT_LINES = 80


def modules() -> dict:
    "module name -> parsed source, for every mmfusion/*.py but `_modidx` and `__init__`"
    return {p.stem: ast.parse(p.read_text(encoding='utf-8'), str(p)) for p in sorted(LIB.glob('*.py'))
            if p.stem not in ('_modidx', '__init__')}


def _target(dotted:str|None, known) -> str|None:
    "The mmfusion module an absolute dotted name ('mmfusion.x', 'mmfusion.x.y') refers to, else None"
    parts = (dotted or '').split('.')
    return parts[1] if len(parts) > 1 and parts[0] == 'mmfusion' and parts[1] in known else None


def _import_module_arg(node:ast.AST):
    "For `importlib.import_module(...)`, `import_module(...)` or `__import__(...)`: (first argument node, package node or None), else None"
    if not isinstance(node, ast.Call) or not node.args: return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ('import_module', '__import__'): return None
    pkg = node.args[1] if len(node.args) > 1 and name == 'import_module' else next((k.value for k in node.keywords if k.arg == 'package'), None)
    return node.args[0], pkg


def _dynamic_target(node:ast.Call, known):
    "The mmfusion module a dynamic import names: a module name, '?' when the name is computed, None when it is not mmfusion's"
    arg, pkg = _import_module_arg(node)
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)): return '?'
    s = arg.value
    if s.startswith('.'):  # relative: import_module('.x', 'mmfusion') / import_module('.x', __package__)
        return s.lstrip('.').split('.')[0] if s.lstrip('.').split('.')[0] in known else None
    return _target(s, known)


def imports(name:str, tree:ast.Module, known) -> list:
    "(line, target module, how) for every mmfusion import in one module, at any depth (functions, methods, branches)"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x
                if node.module: out.append((node.lineno, node.module.split('.')[0], f"from {'.'*node.level}{node.module} import ..."))
                else: out += [(node.lineno, a.name, f"from . import {a.name}") for a in node.names if a.name in known]
            elif node.module == 'mmfusion': out += [(node.lineno, a.name, f"from mmfusion import {a.name}") for a in node.names if a.name in known]
            elif (t := _target(node.module, known)): out.append((node.lineno, t, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, t, f"import {a.name}") for a in node.names if (t := _target(a.name, known))]
        elif _import_module_arg(node) and (t := _dynamic_target(node, known)):
            out.append((node.lineno, t, f"{ast.unparse(node.func)}({', '.join(ast.unparse(a) for a in node.args)})"))
    return [o for o in out if o[1] != name]


def graph() -> tuple:
    "module -> {target: [(line, how)]} over every module, and the computed (unresolvable) dynamic imports"
    mods = modules()
    g, dynamic = {m: {} for m in mods}, []
    for m, tree in mods.items():
        for line, t, how in imports(m, tree, mods):
            if t == '?': dynamic.append((m, line, how))
            else: g[m].setdefault(t, []).append((line, how))
    return g, dynamic


def find_cycles(g:dict) -> list:
    "Every elementary cycle found by a depth-first search, each as a path [a, b, ..., a] (one per strongly connected tangle is enough to fail)"
    cycles, state = [], {}  # state: 1 on the stack, 2 done
    def visit(m, stack):
        state[m] = 1; stack.append(m)
        for t in sorted(g.get(m, {})):
            if state.get(t) == 1: cycles.append(stack[stack.index(t):] + [t])
            elif t in g and not state.get(t): visit(t, stack)
        stack.pop(); state[m] = 2
    for m in sorted(g):
        if not state.get(m): visit(m, [])
    return cycles


def _where(g, path) -> str:
    "A cycle with the line of each edge: a -> b (a.py:12) -> ..."
    return ' -> '.join([path[0]] + [f"{b} ({a}.py:{g[a][b][0][0]})" for a, b in zip(path, path[1:])])


SAMPLE = """
from .data import x
from . import fusion
import mmfusion.model as mm, mmfusion.training
from mmfusion.evaluation import y, _hidden
def f():
    from .diagnosis import z
    import importlib
    return importlib.import_module('mmfusion.detection'), importlib.import_module('.deploy', 'mmfusion'), importlib.import_module(name)
class C:
    def g(self): return __import__('mmfusion.serve'), mm._private_helper, fusion._other, mmfusion.training._t
"""


def test_the_parser_sees_every_import_form():
    "The checks below are only as good as the parser: each form of import, at any depth, is found"
    known = {'data', 'fusion', 'model', 'training', 'evaluation', 'diagnosis', 'detection', 'deploy', 'serve', 'sample'}
    tree = ast.parse(SAMPLE)
    got = sorted({t for _, t, _ in imports('sample', tree, known)})
    assert got == sorted({'?', 'data', 'fusion', 'model', 'training', 'evaluation', 'diagnosis', 'detection', 'deploy', 'serve'}), got
    aliases = _module_aliases(tree, known)
    assert aliases == {'fusion': 'fusion', 'mm': 'model'}, aliases
    attrs = sorted(f"{_module_of(n.value, aliases, known)}.{n.attr}" for n in ast.walk(tree)
                   if isinstance(n, ast.Attribute) and _private(n.attr) and _module_of(n.value, aliases, known))
    assert attrs == ['fusion._other', 'model._private_helper', 'training._t'], attrs
    assert find_cycles({'a': {'b': []}, 'b': {'c': []}, 'c': {'a': []}, 'd': {'a': []}}) == [['a', 'b', 'c', 'a']]


def test_import_graph_has_no_cycle():
    g, _ = graph()
    cycles = find_cycles(g)
    assert not cycles, f"{len(cycles)} import cycle(s) in mmfusion/ (imports inside functions count):\n" + '\n'.join(_where(g, c) for c in cycles)


def test_every_module_has_a_floor():
    missing = sorted(set(modules()) - set(FLOORS))
    assert not missing, (f"mmfusion module(s) {missing} have no floor: add each to FLOORS in tests/test_architecture.py "
                         "(and to the floor order in RULES.md / the architecture docs), at the lowest floor its imports allow")


def test_imports_go_down_the_floors():
    g, dynamic = graph()
    up = [f"{m}.py:{line} ({how}): {m} (floor {FLOORS[m]}) imports {t} (floor {FLOORS[t]})"
          for m, ts in g.items() if m in FLOORS for t, uses in ts.items() if t in FLOORS and FLOORS[t] > FLOORS[m] for line, how in uses]
    hidden = [f"{m}.py:{line}: {how} imports a computed name (only floors >= runs may; name the module literally)"
              for m, line, how in dynamic if FLOORS.get(m, -1) < DYNAMIC_OK]
    assert not up + hidden, f"{len(up + hidden)} import(s) go up the floors:\n" + '\n'.join(up + hidden)


def _module_aliases(tree:ast.Module, known) -> dict:
    "Local names bound to an mmfusion module: `from . import x`, `import mmfusion.x as y`, `y = importlib.import_module('mmfusion.x')`"
    al = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 and not node.module or node.module == 'mmfusion'):
            al.update({a.asname or a.name: a.name for a in node.names if a.name in known})
        elif isinstance(node, ast.Import):
            al.update({a.asname: t for a in node.names if a.asname and (t := _target(a.name, known))})
        elif isinstance(node, ast.Assign) and _import_module_arg(node.value) and (t := _dynamic_target(node.value, known)) not in (None, '?'):
            al.update({x.id: t for x in node.targets if isinstance(x, ast.Name)})
    return al


def _module_of(expr:ast.AST, aliases:dict, known) -> str|None:
    "The mmfusion module an expression evaluates to: an alias, `mmfusion.x`, or `importlib.import_module('mmfusion.x')`"
    if isinstance(expr, ast.Name): return aliases.get(expr.id)
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == 'mmfusion' and expr.attr in known: return expr.attr
    if _import_module_arg(expr) and (t := _dynamic_target(expr, known)) not in (None, '?'): return t
    return None


def _private(n:str) -> bool: return n.startswith('_') and not (n.startswith('__') and n.endswith('__'))


def private_imports() -> list:
    "'file:line: what' for every private name one mmfusion module takes from another"
    mods, out = modules(), []
    for m, tree in mods.items():
        aliases = _module_aliases(tree, mods)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = (node.module or '').split('.')[0] if node.level else _target(node.module, mods)
                if src and src != m: out += [f"{m}.py:{node.lineno}: from {'.'*node.level}{node.module} import {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and (src := _module_of(node.value, aliases, mods)) and src != m:
                out.append(f"{m}.py:{node.lineno}: {ast.unparse(node)} ({src}.{node.attr})")
    return sorted(set(out))


def test_no_private_names_across_modules():
    bad = private_imports()
    assert not bad, (f"{len(bad)} use(s) of another module's _private name (make it public, with docs and a lesson, "
                     "or move the code that needs it):\n" + '\n'.join(bad))


# the old ways of guessing a run's kind; only `config.run_kind` may look at these keys
SNIFFING = [r"""['"]scorer['"]\s+in\b""", r"""['"]baseline['"]\s+in\b""", r"_is_detection",
            r"""import_module\(\s*['"]mmfusion\.detection['"]""", r"""['"]modalities['"]\s+in\s+(data|load_checkpoint)\b""",
            r"""\.get\(\s*['"](scorer|baseline)['"]\s*\)\s*(is|is not)\s+None""", r"isinstance\(\w+,\s*(Detection|Anomaly)?Predictor\)"]


def _function_lines(tree:ast.Module, name:str) -> range:
    "The lines of the module-level function `name` (empty when there is none)"
    f = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    return range(min([f.lineno] + [d.lineno for d in f.decorator_list]), f.end_lineno + 1) if f else range(0)


def sniffing_sites() -> list:
    "'file:line: code' for every line outside `config.run_kind` that matches an old kind-sniffing pattern (comment lines skipped)"
    pats, out = [re.compile(p) for p in SNIFFING], []
    for p in sorted(LIB.glob('*.py')):
        if p.stem in ('_modidx', '__init__'): continue
        text = p.read_text(encoding='utf-8')
        skip = _function_lines(ast.parse(text), 'run_kind') if p.stem == 'config' else range(0)
        for i, line in enumerate(text.splitlines(), 1):
            if i in skip or line.lstrip().startswith('#'): continue
            if any(r.search(line) for r in pats): out.append(f"{p.name}:{i}: {line.strip()}")
    return out


def test_kind_is_decided_in_one_function():
    bad = sniffing_sites()
    assert not bad, (f"{len(bad)} line(s) guess a run's kind from its keys; ask `mmfusion.config.run_kind(cfg)` "
                     "(or RunFolder.kind) instead:\n" + '\n'.join(bad))


def _first_definition(src:str) -> str:
    "The first def/class/assignment a cell defines, for messages"
    m = re.search(r"^(?:async\s+)?(?:def|class)\s+(\w+)|^(\w+)\s*[:=]", src, re.M)
    return (m.group(1) or m.group(2)) if m else src.strip().splitlines()[0][:60]


def long_export_cells(limit:int=MAX_EXPORT_LINES) -> list:
    "(lines, notebook, cell index, first definition) for every exported cell of nbs/*.ipynb (not tutorials) longer than `limit` lines"
    out = []
    for nb in sorted(NBS.glob('*.ipynb')):
        for i, c in enumerate(json.loads(nb.read_text(encoding='utf-8'))['cells']):
            src = ''.join(c['source']) if isinstance(c['source'], list) else c['source']
            if c['cell_type'] != 'code' or not re.match(r"#\|\s*export\b", src): continue
            n = len(src.rstrip('\n').splitlines())
            if n > limit: out.append((n, nb.name, i, _first_definition(src)))
    return sorted(out, reverse=True)


def test_export_cells_are_short():
    bad = long_export_cells()
    assert not bad, (f"{len(bad)} exported cell(s) longer than {MAX_EXPORT_LINES} lines (split each into steps, each followed by a lesson):\n"
                     + '\n'.join(f"{nb} cell {i} ({name}): {n} lines" for n, nb, i, name in bad))


def test_lower_floors_do_not_pull_in_heavy_libraries():
    "Importing core, data or fusion must not load transformers or ultralytics (fusion did: it took Registry from encoders)"
    import subprocess, sys
    code = ("import sys, mmfusion.core, mmfusion.data, mmfusion.fusion; "
            "print(sorted(m for m in ('transformers', 'ultralytics') if m in sys.modules))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == '[]', f"importing core/data/fusion loaded {r.stdout.strip()}"
