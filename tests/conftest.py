import sys
from pathlib import Path

import torch

# Tests import helpers from this folder (dist_utils); spawned workers need it on the path too.
sys.path.insert(0, str(Path(__file__).parent))
# Small ops on 2 cores: one thread is faster and immune to contention with other processes.
torch.set_num_threads(1)
torch.set_flush_denormal(True)
