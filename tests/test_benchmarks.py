"""Smoke test of the benchmark scripts in quick mode: they run end to end, every method runs,
and the JSON / markdown results have the expected structure. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def _run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FAPM_BENCH_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Both scripts in quick mode, started together (each is mostly waiting on children)."""
    tmp = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, FAPM_BENCH_CACHE=str(tmp / "cache"), TQDM_DISABLE="1")
    runs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(tmp / name)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in ("bench_merge", "bench_selection")
    }
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, f"{name} failed:\n{outputs[name][-4000:]}"
    return tmp


def test_merge_quick_runs_every_method(quick_results):
    sys.path.insert(0, str(BENCH))
    import bench_merge

    result = json.loads((quick_results / "bench_merge" / "merge.json").read_text())
    expected = {"io_floor", *bench_merge.PAIR_METHODS}
    assert set(result["medians"]) == expected
    assert {run["method"] for run in result["runs"]} == expected
    for row in result["medians"].values():
        assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["peak_rss_gb"] > 0
        # sampled anonymous memory: some, and never more than the resident peak
        assert 0 < row["peak_anon_gb"] <= row["peak_rss_gb"]
        assert {"wall_vs_ta", "wall_vs_floor", "rss_vs_ta"} <= set(row)
    ta_wall = result["medians"]["task_arithmetic"]["wall_s"]
    for row in result["medians"].values():  # the ratios are what the walls say
        assert row["wall_vs_ta"] == pytest.approx(row["wall_s"] / ta_wall, rel=0.02)
    assert result["meta"]["quick"] is True and result["meta"]["rounds"] == 1
    for key in ("nproc", "ram_gb", "cpu", "torch", "mergekit", "command"):
        assert key in result["meta"]
    assert set(result["targets"]) >= {"fapm wall <= 1.5x task_arithmetic"}
    table = (quick_results / "bench_merge" / "merge.md").read_text()
    assert "| `fapm` |" in table and "| `io_floor` |" in table


def test_selection_quick_is_exact(quick_results):
    result = json.loads((quick_results / "bench_selection" / "selection.json").read_text())
    methods = {run["method"] for run in result["runs"]}
    assert methods == {"keep_top_k", "argsort", "topk", "kthvalue"}
    for run in result["runs"]:
        assert run["time_s"] > 0 and run["extra_bytes"] >= 0
        if run["method"] != "kthvalue":  # kthvalue's mask keeps every tie at the threshold
            assert run["kept"] == run["k"]
    assert result["exactness"] and all(c["keep_top_k_equals_stable_sort"] for c in result["exactness"])
    assert "| `keep_top_k` |" in (quick_results / "bench_selection" / "selection.md").read_text()


def test_cuda_flag_fails_clearly_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for script in ("bench_merge.py", "bench_selection.py"):
        done = _run(script, "--quick", "--device", "cuda", "--out", str(tmp_path), tmp_path=tmp_path)
        assert done.returncode == 2
        assert "needs a CUDA build of torch" in done.stderr


def test_threads_quick_prints_every_method_at_every_thread_count():
    done = subprocess.run([sys.executable, str(BENCH / "bench_threads.py"), "--quick",
                           "--threads", "1,2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 512 x 1024")]
    from fapm_merge import native

    fapm = (["fapm 0.9 (C pass)", "fapm 0.9 (torch pass)"] if native.library() is not None
            else ["fapm 0.9"])
    assert [row.split(" | ")[1] for row in rows] == ["task_arithmetic", "ties (magnitude 0.1)", *fapm]
    for row in rows:
        cells = row.strip("| ").split(" | ")[2:4]
        assert all(float(cell) >= 0 for cell in cells)


def test_sweep_quick_scores_the_same_as_the_naive_loop(tmp_path):
    """benchmarks/bench_sweep.py on a tiny pair: one point through mergekit-yaml + lm-eval
    processes and through one sweep process; the script exits non-zero on any difference."""
    done = subprocess.run([sys.executable, str(BENCH / "bench_sweep.py"), "--quick",
                           "--cache", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "scores identical: True" in done.stdout


def test_scaling_quick_fits_growth_over_layers_and_fine_tunes(tmp_path):
    """--layers and --fine-tunes in quick mode: every method at every point, the fitted
    slopes reproduce the medians they were fitted to, and the plots are written."""
    out = tmp_path / "scale"
    for args in (["--layers", "1,2,3", "--methods", "task_arithmetic", "fapm"],
                 ["--fine-tunes", "1,2", "--methods", "ties", "fapm_ties",
                  "--label", "other-box"]):  # a run elsewhere: its own files
        done = _run("bench_merge.py", "--quick", *args, "--out", str(out), tmp_path=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    layers = json.loads((out / "layers-quick.json").read_text())
    assert sorted(layers["points"]) == ["1", "2", "3"]
    for med in layers["points"].values():
        assert set(med) == {"io_floor", "task_arithmetic", "fapm"}
        assert all(row["wall_s"] > 0 and row["peak_rss_gb"] > 0 for row in med.values())
    fit = layers["growth"]["fapm"]["wall_s"]
    walls = [layers["points"][str(x)]["fapm"]["wall_s"] for x in (1, 2, 3)]
    for x, wall, residual in zip((1, 2, 3), walls, fit["residuals"]):
        assert fit["intercept"] + fit["slope"] * x + residual == pytest.approx(wall)
    assert fit["slope_se"] is not None
    assert not (out / "fine-tunes-quick.json").exists()
    tunes = json.loads((out / "fine-tunes-quick-other-box.json").read_text())
    assert sorted(tunes["points"]) == ["1", "2"]
    assert set(tunes["points"]["2"]) == {"io_floor", "ties", "fapm_ties"}
    assert any("fapm_ties wall <= 1.0x ties" in name for name in tunes["targets"])
    for stem in ("layers-quick", "fine-tunes-quick-other-box"):
        assert (out / f"{stem}.png").stat().st_size > 0
        table = (out / f"{stem}.md").read_text()
        method = "fapm" if stem.startswith("layers") else "fapm_ties"
        assert f"| 2 | `{method}` |" in table and f"| `{method}` |" in table  # point, growth


def test_fit_line_recovers_a_known_line():
    sys.path.insert(0, str(BENCH))
    import bench_merge

    fit = bench_merge.fit_line([1, 2, 4], [3.0, 5.0, 9.0])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["slope_se"] == pytest.approx(0.0, abs=1e-12)
    assert max(abs(r) for r in fit["residuals"]) < 1e-12


def test_trace_memory_splits_each_tensors_peak_into_anonymous_and_file_backed(tmp_path):
    sys.path.insert(0, str(BENCH))
    import bench_merge
    import trace_memory

    base, (ft,) = bench_merge.build_models(bench_merge.QUICK, tmp_path / "models", 4_000_000)
    rows = trace_memory.trace("fapm", base, ft)
    names = {row["tensor"] for row in rows}
    expected = set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == expected  # one row per output tensor, each saved once
    assert len(rows) == len(names)
    for row in rows:  # the two parts, sampled at the same moment, make up the resident set
        assert 0 < row["RssAnon"] <= row["VmRSS"]
        assert row["RssAnon"] + row["RssFile"] <= row["VmRSS"] * 1.01 + 1e6
