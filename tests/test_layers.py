"""`pomt` is the deployable layer: it must import with Lightning, datasets and wandb absent."""

from __future__ import annotations

import subprocess
import sys


def test_pomt_imports_without_lightning_datasets_or_wandb():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'lightning', 'pytorch_lightning', 'datasets', 'wandb', 'torchmetrics'}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pomt\n"
        "from pomt import apply_pruning, profile_latency, select_r, token_layout\n"
        "import pomt.report, pomt.plots, pomt.timing\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
