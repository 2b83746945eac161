"""Give notebooks the project's kernelspec (`mmfusion`, the kernel `make lab` registers), leaving everything else as it is.

nbdev_clean keeps `kernelspec` (and sets its display_name to its name), so the value written here survives it.
Idempotent: a notebook that already has it is not rewritten. With no argument, every notebook under nbs/.
    .venv/bin/python .ci/set_kernelspec.py [nbs/X.ipynb ...]      # prints the notebooks it changed
    .venv/bin/python .ci/set_kernelspec.py --check                 # exit 1, naming them, if any lacks it
"""
import json, os, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = 'mmfusion'
KERNELSPEC = {'display_name': KERNEL, 'language': 'python', 'name': KERNEL}  # display_name as nbdev_clean writes it


def notebooks(args=()) -> list:
    "The notebooks named, else every notebook under nbs/ as nbdev finds them (names starting with '.' or '_' are not)"
    if args: return [Path(a).resolve() for a in args]
    return sorted(p for p in (ROOT/'nbs').rglob('*.ipynb') if not any(s.startswith(('.', '_')) for s in p.relative_to(ROOT/'nbs').parts))


def kernel_name(path:Path) -> str:
    "The kernelspec name saved in the notebook at `path` (None if it has none)"
    return json.loads(path.read_text(encoding='utf-8')).get('metadata', {}).get('kernelspec', {}).get('name')


def set_kernelspec(path:Path) -> bool:
    "Write KERNELSPEC into the notebook at `path` (atomically, in nbdev_clean's JSON layout); True if it changed"
    nb = json.loads(path.read_text(encoding='utf-8'))
    if nb.get('metadata', {}).get('kernelspec') == KERNELSPEC: return False
    nb.setdefault('metadata', {})['kernelspec'] = dict(KERNELSPEC)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    os.replace(tmp, path)
    return True


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if a != '--check']
    if '--check' in sys.argv:
        wrong = [f'{os.path.relpath(p)} ({kernel_name(p)})' for p in notebooks(args) if kernel_name(p) != KERNEL]
        if wrong: sys.exit(f"kernelspec is not '{KERNEL}' in: " + ', '.join(wrong) + ' (run .ci/set_kernelspec.py)')
    else:
        for p in notebooks(args):
            if set_kernelspec(p): print(os.path.relpath(p))
