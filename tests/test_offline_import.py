"Importing mmfusion makes no network attempt: sockets are blocked before the first import, in a fresh interpreter with a clean environment"
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# runs in the child: every way to reach the network is replaced, before anything is imported, by a recorder that refuses
CHILD = r'''
import json, socket, sys
attempts = []
def refuse(name):
    def f(*a, **k):
        attempts.append(f"{name}{a[1:] if name == 'socket.connect' else a}"[:200])
        raise OSError(f"network blocked by test_offline_import: {name}")
    return f
socket.socket.connect = refuse('socket.connect')
socket.socket.connect_ex = refuse('socket.connect_ex')
socket.create_connection = refuse('socket.create_connection')
socket.getaddrinfo = refuse('socket.getaddrinfo')
import os
import mmfusion.detection, mmfusion.encoders, mmfusion.cli
print(json.dumps({'attempts': attempts, 'YOLO_OFFLINE': os.environ.get('YOLO_OFFLINE'), 'ultralytics': 'ultralytics' in sys.modules}))
'''

# variables that would switch a library's network check off from outside, hiding whether mmfusion does it itself
OFFLINE_VARS = {'YOLO_OFFLINE', 'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'NO_ALBUMENTATIONS_UPDATE'}


def test_import_makes_no_network_attempt(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    env.update(PYTHONPATH=str(ROOT), MPLBACKEND='Agg', OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-c', CHILD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"importing mmfusion with sockets blocked failed:\n{r.stderr[-3000:]}"
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got['ultralytics'], "the import did not reach ultralytics, so this test proves nothing about it"
    assert not got['attempts'], f"importing mmfusion tried the network {len(got['attempts'])} time(s):\n" + '\n'.join(got['attempts'])
    assert got['YOLO_OFFLINE'] == '1', f"YOLO_OFFLINE is {got['YOLO_OFFLINE']!r} after importing mmfusion (mmfusion.core sets it to '1')"
