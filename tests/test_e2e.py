"""End to end through the real mergekit commands, in subprocesses, on tiny Llama models."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import zipfile
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from conftest import load_state, run_tool, tiny_config

ROOT = Path(__file__).parent.parent
RECIPES = ROOT / "recipes"


def expected_kept(base: torch.Tensor, ft: torch.Tensor, sparsity: Decimal) -> int:
    changed = int((ft != base).sum())
    return min(math.floor((1 - sparsity) * base.numel()), changed)


def kept_in_output(base: torch.Tensor, out: torch.Tensor) -> int:
    return int((out != base).sum())


def bf16_state(path: Path) -> dict:
    return {k: v.to(torch.bfloat16) for k, v in load_state(path).items()}


def test_mergekit_yaml_runs_fapm_without_a_wrapper(recipe_workdir, tmp_path):
    out = tmp_path / "basic"
    run_tool("mergekit-yaml", RECIPES / "fapm-basic.yml", out, cwd=recipe_workdir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == tiny_config().num_hidden_layers
    base = bf16_state(recipe_workdir / "models/base")
    ft = bf16_state(recipe_workdir / "models/rte-sft")
    merged = load_state(out)
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        kept = tensor != base[name]
        assert kept_in_output(base[name], tensor) == expected_kept(
            base[name], ft[name], Decimal("0.9")
        ), name
        assert torch.equal(tensor[kept], ft[name][kept]), name


def per_module_sparsity(name: str, layers: int) -> Decimal:
    """The sparsity recipes/fapm-per-module.yml asks for, written out independently."""
    if "embed_tokens" in name or "lm_head" in name:
        return Decimal(1)
    if "norm" in name:
        return Decimal(0)
    if "self_attn" in name:
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        return Decimal("0.95") + (Decimal("0.85") - Decimal("0.95")) * layer / (layers - 1)
    return Decimal("0.9")


def test_per_module_overrides_and_layer_gradient(recipe_workdir, tmp_path):
    out = tmp_path / "per-module"
    run_tool("mergekit-yaml", RECIPES / "fapm-per-module.yml", out, cwd=recipe_workdir)
    base = bf16_state(recipe_workdir / "models/base")
    ft = bf16_state(recipe_workdir / "models/rte-sft")
    merged = load_state(out)
    layers = tiny_config().num_hidden_layers
    seen = set()
    for name, tensor in merged.items():
        sparsity = per_module_sparsity(name, layers)
        seen.add(sparsity)
        assert kept_in_output(base[name], tensor) == expected_kept(
            base[name], ft[name], sparsity
        ), (name, sparsity)
    assert {Decimal(0), Decimal(1), Decimal("0.95"), Decimal("0.85")} <= seen


def test_mergekit_multi_two_stages(recipe_workdir, tmp_path):
    out = tmp_path / "multi-out"
    run_tool(
        "mergekit-multi",
        RECIPES / "fapm-then-ties.multi.yml",
        "-I",
        tmp_path / "stages",
        "--out-path",
        out,
        "--no-lazy",
        cwd=recipe_workdir,
    )
    base = bf16_state(recipe_workdir / "models/base")
    math_ft = bf16_state(recipe_workdir / "models/math-sft")
    stage = load_state(tmp_path / "stages" / "math-fapm")
    name = "model.layers.0.mlp.down_proj.weight"
    assert kept_in_output(base[name], stage[name]) == expected_kept(
        base[name], math_ft[name], Decimal("0.9")
    )
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out)
    changed = sum(int((p != base[n]).sum()) for n, p in final.state_dict().items())
    assert changed > 0


def test_fapm_merge_run_writes_complete_output(recipe_workdir, tmp_path):
    out = tmp_path / "run-out"
    run_tool("fapm-merge", "run", RECIPES / "fapm-basic.yml", out, cwd=recipe_workdir)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not list(tmp_path.glob(".run-out.partial-*"))


def test_python_start_imports_neither_torch_nor_mergekit():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True
    )
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "fapm_merge._hook" in imported, "the .pth hook is not installed"
    assert not {m for m in imported if m.split(".")[0] in ("torch", "mergekit")}


@pytest.mark.parametrize(
    "code",
    [
        "from mergekit.merge import run_merge\nfrom mergekit.merge_methods import get\n"
        "print(get('fapm').spec.name, get('fapm_ties').spec.name)",
        # explicit import first, then mergekit: registration must not recurse or duplicate
        "import fapm_merge.methods\nimport fapm_merge\nfapm_merge.register()\n"
        "from mergekit.merge_methods import get\nprint(get('fapm').spec.name, get('fapm_ties').spec.name)",
    ],
)
def test_registration_in_a_fresh_interpreter(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fapm", "fapm_ties"]


def test_wheel_ships_the_hook_and_not_the_study(tmp_path):
    """A regular (non-editable) install gets the .pth at the top of site-packages; the
    research study (fapm_study/) stays in the repository."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, ROOT],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("fapm_merge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fapm_merge_hook.pth" in names
    assert "fapm_merge/_hook.py" in names
    assert "fapm_merge/inspect/stats.py" in names and "fapm_merge/sweep/engine.py" in names
    assert not [name for name in names if "study" in name.split("/")[0]]


def test_hook_keeps_mergekit_loader_intact():
    code = (
        "import importlib.resources, inspect, mergekit.merge_methods as m\n"
        "from fapm_merge._hook import _RegisterAfterExec\n"
        "assert isinstance(m.__loader__, _RegisterAfterExec), type(m.__loader__)\n"
        "assert m.__loader__.is_package('mergekit.merge_methods')\n"
        "assert m.__loader__.get_filename('mergekit.merge_methods').endswith('__init__.py')\n"
        "assert inspect.getsourcefile(m).endswith('merge_methods/__init__.py')\n"
        "names = {p.name for p in importlib.resources.files('mergekit.merge_methods').iterdir()}\n"
        "assert 'registry.py' in names, names\n"
        "from mergekit.merge_methods import registry\n"
        "assert 'fapm' in {x.spec.name for x in registry.registered_methods()}\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
