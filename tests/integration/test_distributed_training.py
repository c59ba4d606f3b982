"""Data-parallel training under a real torchrun (2 CPU processes, gloo on loopback) takes the
steps of a single process: same global batches, gradients averaged by DDP."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from onerec.config import PROJECT_ROOT
from tests.unit.test_train import SIZES, model_config

pytestmark = pytest.mark.integration

# Equal shards (54 examples: batches of 16, 16, 16, 6 split 8/8 and 3/3), no dropout, no MoE:
# then the mean of the shards' mean losses is the batch's mean loss, and the runs must agree.
TRAINING = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import save_file
    from onerec.model import build_model
    from onerec.model.data import build_examples
    from onerec.model.train import train
    from tests.unit.test_train import SIZES, cycle_sequences, item_codes, model_config, train_config

    torch.set_num_threads(1)
    seqs, _ = cycle_sequences()
    data = build_examples(seqs, item_codes(), max_seq_len=6, session_len=1)
    torch.manual_seed(0)
    model = build_model(model_config("v2", n_experts=0, session_len=1), codebook_sizes=SIZES)
    seen = []                                   # examples this process trained on
    batch = data.batch
    object.__setattr__(data, "batch", lambda idx: (seen.append(len(idx)), batch(idx))[1])
    result = train(model, data, train_config(epochs=3), seed=0, progress=False)
    rank = __import__("os").environ.get("RANK", "single")
    print(f"rank {rank}: {sum(seen)} examples")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{sys.argv[1]}/{rank}.safetensors")
    print(f"rank {rank}: {result.steps} steps, stopped {result.stopped}")
""")


def test_two_rank_torchrun_equals_one_process(tmp_path):
    script = tmp_path / "train_one.py"
    script.write_text(TRAINING)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, env=env, cwd=PROJECT_ROOT,
                   timeout=300)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path)], env=env, cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    single, rank0, rank1 = (load_file(str(tmp_path / f"{r}.safetensors")) for r in ("single", "0", "1"))
    steps = 3 * 4                                     # epochs x batches per epoch
    assert run.stdout.count(f"{steps} steps, stopped epochs") == 2, run.stdout
    assert run.stdout.count(f": {3 * 27} examples") == 2, run.stdout   # each rank half of the 54 per epoch
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"{key}: the ranks diverged"
        assert torch.allclose(rank0[key], single[key], atol=1e-5, rtol=1e-4), f"{key}: != single process"
    # and training moved the weights (the comparison is not between two untouched inits)
    torch.manual_seed(0)
    from onerec.model import build_model

    init = build_model(model_config("v2", n_experts=0, session_len=1), codebook_sizes=SIZES).state_dict()
    assert any(not torch.allclose(init[k], single[k]) for k in single)
