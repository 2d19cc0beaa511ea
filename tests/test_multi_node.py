"""Two nodes on one machine: two `torchrun --nnodes 2 --nproc_per_node 1` launchers meet through
c10d rendezvous on localhost, as two cluster nodes would. main.py's criteria and C equal a
one-process run's (summed in another order: equal up to round-off); main_deploy.py's two
ranks hold the same weights, bit for bit, after every epoch."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import call_entry, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--data-set", "DIGITS", "--input-size", "32", "--device", "cpu", "--num_workers", "0"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")

# every rank saves the weights it evaluates after each epoch (the training loop's `evaluate`)
SPY = """
import os, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
import engine.training, main_deploy
real_evaluate = engine.training.evaluate


def spy(loader, model, device, *args, **kwargs):
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    epoch = len([n for n in os.listdir({spy!r}) if n.endswith("_rank%d.pth" % dist.get_rank())])
    torch.save(net.state_dict(), os.path.join({spy!r}, "epoch%d_rank%d.pth" % (epoch, dist.get_rank())))
    return real_evaluate(loader, model, device, *args, **kwargs)


engine.training.evaluate = spy
main_deploy.main(main_deploy.get_args_parser().parse_args())
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _two_nodes(script_and_flags, timeout=300):
    """Run two single-process torchrun launchers, node ranks 0 and 1, through one c10d rendezvous."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(node), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "savit",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", *script_and_flags],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in range(2)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _load_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.e2e
def test_main_py_on_two_nodes_scores_as_one_process(tmp_path, monkeypatch, capsys):
    flags = ["--model", "deit_test_patch8_32", *DATA, "--batch-size", "16", "--pruning_feed_percent", "0.1",
             "--need_hessian", "--pruning_flops_percentage", "0.5"]
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    code, err = call_entry("main", [*flags, "--output_dir", tmp_path / "one"], capsys)  # the one process: here
    assert code == 0, err[-3000:]
    outputs = _two_nodes(["main.py", *flags, "--output_dir", str(tmp_path / "two")])
    assert any("on this process" in out for out in outputs)
    for name in ["hessian.pickle"] + [f"criteria_m2l{layer}_final.pickle" for layer in range(3)]:
        two, single = _load_pickle(tmp_path / "two" / name), _load_pickle(tmp_path / "one" / name)
        np.testing.assert_allclose(two, single, rtol=1e-5, atol=0, err_msg=name)


@pytest.mark.e2e
def test_main_deploy_on_two_nodes_ranks_agree(tmp_path):
    spy = tmp_path / "spy"
    spy.mkdir()
    wrapper = tmp_path / "spy_main_deploy.py"
    wrapper.write_text(SPY.format(repo=REPO, spy=str(spy)))
    out = tmp_path / "train"
    _two_nodes([str(wrapper), "--model", "deit_test_patch8_32_deploy", *DATA, "--batch-size", "64", "--epochs", "2",
                "--warmup-epochs", "0", "--cooldown-epochs", "0", "--no-model-ema", "--dist-eval",
                "--output_dir", str(out)])
    for epoch in range(2):
        rank0, rank1 = (torch.load(spy / f"epoch{epoch}_rank{r}.pth", weights_only=True) for r in range(2))
        assert rank0.keys() == rank1.keys()
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), epoch
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)
