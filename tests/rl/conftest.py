"""Make the test doubles in this folder importable (pytest runs with --import-mode=importlib)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
