"""Shared fixtures: tiny Llama checkpoints generated on the spot (no downloads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A console script of this environment (mergekit-yaml, fapm-merge, ...)."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


def run_tool(*args, cwd=None, check=True, env=None) -> subprocess.CompletedProcess:
    merged_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    merged_env.update(env or {})
    result = subprocess.run(
        [tool(args[0]), *map(str, args[1:])],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=merged_env,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def tiny_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_model(path: Path, state_dict=None, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny LlamaForCausalLM; ``state_dict`` overrides its random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config_overrides))
    with torch.no_grad():
        for param in model.parameters():  # distinct magnitudes, no exact zeros
            param.copy_(torch.randn_like(param) * 0.05 + 0.001)
        if state_dict is not None:
            model.load_state_dict(state_dict)
    model.save_pretrained(path)
    return path


def fine_tune_of(base_dir: Path, path: Path, seed: int, scale: float = 0.01) -> Path:
    """A 'fine-tune': base + a dense random task vector (a few elements unchanged)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            delta = torch.randn(param.shape, generator=generator) * scale
            delta[torch.rand(param.shape, generator=generator) < 0.02] = 0
            param.add_(delta)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A base and two fine-tunes of it, in float32 safetensors."""
    root = tmp_path_factory.mktemp("models")
    base = save_model(root / "base")
    return {
        "root": root,
        "base": base,
        "ft_a": fine_tune_of(base, root / "ft_a", seed=1),
        "ft_b": fine_tune_of(base, root / "ft_b", seed=2, scale=0.02),
    }


def load_state(path) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


@pytest.fixture(scope="session")
def recipe_workdir(tmp_path_factory):
    """A folder laid out as the recipes in recipes/ expect: ./models/{base,*-sft}."""
    root = tmp_path_factory.mktemp("workdir")
    models = root / "models"
    base = save_model(models / "base")
    for seed, name in enumerate(["rte-sft", "math-sft", "code-sft"], start=1):
        fine_tune_of(base, models / name, seed=seed, scale=0.01 * seed)
    return root
