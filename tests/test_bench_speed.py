"""benchmarks/bench_deploy_speed.py on the tiny test DeiT: torch and ONNX Runtime rows, the summary
table, ratios read back from the measured img/s, and rows with a low CPU share left unpublished."""
import importlib.util
import os
import re

import pytest

from models import arch_of
from models.mask import PruneMask
from pruning.flops import mask_macs
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "deit_test_patch8_32"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_deploy_speed",
                                                  os.path.join(ROOT, "benchmarks", "bench_deploy_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mask(arch, heads, mlp, embed) -> PruneMask:
    """Keep the first `heads` heads, `mlp` neurons of every block and `embed` channels."""
    mask = PruneMask(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, head_dim=arch.head_dim,
                     mlp_hidden=arch.mlp_hidden, heads=[list(range(heads))] * arch.depth,
                     mlp=[list(range(mlp))] * arch.depth, embed=list(range(embed)), model=MODEL)
    mask.validate()
    return mask


def _cells(line: str):
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.e2e
def test_bench_table_runtimes_ratios_and_unpublished_rows(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    bench = _bench()
    arch = arch_of(MODEL)
    masks = {f"{MODEL}_0.5.json": _mask(arch, 3, 100, 50), f"{MODEL}_0.5_r16.json": _mask(arch, 3, 128, 48)}
    for name, mask in masks.items():
        mask.save_json(str(tmp_path / name))
    # one row "measured" while other processes took the cores: injected, not timed
    low = ("onnxruntime", 2, f"{MODEL}_0.5_r16.json")
    monkeypatch.setattr(bench, "measured_cpu_share",
                        lambda row, used, threads: 0.5 if (row["runtime"], row["batch"], row["mask"]) == low else 1.0)
    args = bench.parse_args(["--models", MODEL, "--masks-dir", str(tmp_path), "--device", "cpu",
                             "--runtimes", "torch,onnxruntime", "--batch-sizes", "1,2", "--rounds", "1", "--iters", "1",
                             "--warmup", "0", "--train-batch-size", "0", "--threads", "1", "--malloc", "default",
                             "--pruning-pass-log", ""])
    rows, warnings = bench.run(args)
    text = bench.render(args, rows, warnings, "python benchmarks/bench_deploy_speed.py ...", "now", "l0", "l1", 1.0)

    assert len(rows) == len(masks) * 2 * 2  # masks x runtimes x batches
    assert {(r["mask"], r["runtime"], r["batch"]) for r in rows} == {
        (m, rt, b) for m in masks for rt in ("torch", "onnxruntime") for b in (1, 2)}
    for r in rows:
        mask = masks[r["mask"]]
        assert r["flops_ratio"] == pytest.approx(mask_macs(arch)["total"] / mask_macs(arch, mask)["total"])
        assert r["round_to"] == (16 if r["mask"].endswith("_r16.json") else 1)
        # one round: the speedup is pruned / unpruned img/s of that round
        assert r["ratio"] == [p / u for p, u in zip(r["pruned"], r["unpruned"])]
        assert r["speedup"] == pytest.approx(r["pruned"][0] / r["unpruned"][0])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_ratio"])
        assert r["published"] == ((r["runtime"], r["batch"], r["mask"]) != low)

    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| model | mask | round_to | pruned units"))
    columns = _cells(header)
    for col in ("runtime", "mode", "img/s unpruned", "img/s pruned", "speedup (min-max)", "speedup / FLOPs ratio",
                "CPU share"):
        assert col in columns
    table = [_cells(line) for line in lines[lines.index(header) + 2:] if line.startswith("| ")]
    table = table[:len(rows)]
    assert len(table) == len(rows)
    for cells in table:
        row = dict(zip(columns, cells))
        if row["runtime"] == "ORT" and row["mode"] == "infer b2" and row["mask"] == f"`{low[2]}`":
            assert row["img/s unpruned"] == "not published: CPU share 50%"
            assert row["img/s pruned"] == "" and row["speedup (min-max)"] == ""
            continue
        unpruned, pruned = float(row["img/s unpruned"]), float(row["img/s pruned"])
        speedup = float(row["speedup (min-max)"].split()[0])
        assert speedup == pytest.approx(pruned / unpruned, rel=0.01, abs=0.01)
    assert "- not published: 1 of 8 rows" in text
    assert "not published" not in " ".join(line for line in lines if line.startswith(f"{MODEL}"))

    summary = lines[lines.index("## Summary: speedup / FLOPs ratio") + 2:]
    assert _cells(summary[0]) == ["model", "mask", "round_to", "FLOPs ratio", "torch b1", "torch b2", "ORT b1", "ORT b2"]
    by_mask = {_cells(line)[1]: _cells(line) for line in summary[2:4]}
    for r in rows:
        cell = by_mask[f"`{r['mask']}`"][4 + [("torch", 1), ("torch", 2), ("onnxruntime", 1),
                                              ("onnxruntime", 2)].index((r["runtime"], r["batch"]))]
        assert cell == (f"{r['efficiency']:.2f}" if r["published"] else "not published (CPU share 50%)")
    assert by_mask[f"`{MODEL}_0.5_r16.json`"][2] == "16"
    assert re.search(r"onnxruntime \d", text)


@pytest.mark.parametrize("argv, flag", [
    (["--device", "cuda", "--runtimes", "onnxruntime"], "--runtimes"),
    (["--device", "cpu", "--amp"], "--amp"),
    (["--device", "cpu", "--runtimes", "tensorrt"], "--runtimes"),
    (["--device", "cpu", "--batch-sizes", "0"], "--batch-sizes"),
])
def test_bench_bad_flags(argv, flag):
    with pytest.raises(UserError, match=flag):
        _bench().parse_args(argv)


def test_bench_defaults_per_device():
    bench = _bench()
    cpu = bench.parse_args(["--device", "cpu"])
    assert cpu.runtimes == ["torch", "onnxruntime"] and cpu.batch_sizes == [1, 32]
    cuda = bench.parse_args(["--device", "cuda"])  # parsing only: nothing runs on the GPU
    assert cuda.runtimes == ["torch"] and cuda.batch_sizes == [256, 1]
