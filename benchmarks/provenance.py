"""Provenance of a benchmark result: when it ran, on which commit, on what machine, with which recipe.

Every script in benchmarks/ that writes benchmarks/results/NAME.json puts `provenance(recipe)` at the top of it.
"""
from __future__ import annotations
import datetime, os, platform, subprocess


def _git(*args) -> str:
    try: return subprocess.run(['git', *args], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError): return ''


def provenance(recipe:dict) -> dict:
    "date (UTC), commit (and whether library/benchmark/config files differ from it), machine (CPU cores, torch threads, GPU, load), recipe"
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'commit': _git('rev-parse', 'HEAD') or None,
            'uncommitted_changes': bool(_git('status', '--porcelain', '--', 'mmfusion', 'benchmarks', 'configs', ':!benchmarks/results')),  # results are outputs, not code
            'machine': {'cpu_cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(), 'gpu': gpu,
                        'load_average_1min': round(os.getloadavg()[0], 2), 'platform': platform.platform(),
                        'python': platform.python_version(), 'torch': torch.__version__},
            'recipe': recipe}
