"""Model references as mergekit users write them: hub ids from the Hugging Face cache,
``@revision`` and ``model+lora`` — all offline (a cache laid out by hand, a tiny PEFT adapter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fine_tune_of, load_state, run_tool, save_model

REV_A = "a" * 40
REV_B = "b" * 40


def cache_model(hf_home: Path, repo: str, source: Path, revision: str, main: bool = True) -> None:
    """Lay out ``source`` as the cached snapshot ``revision`` of ``repo`` (refs/main too)."""
    entry = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, entry / "snapshots" / revision)
    if main:
        (entry / "refs").mkdir(parents=True, exist_ok=True)
        (entry / "refs" / "main").write_text(revision)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    base = save_model(root / "local" / "base")
    ft = fine_tune_of(base, root / "local" / "ft", seed=1)
    wide = save_model(root / "local" / "wide", intermediate_size=96)
    home = root / "hf"
    cache_model(home, "org/base", base, REV_A)
    cache_model(home, "org/ft", ft, REV_A)
    cache_model(home, "org/ft", wide, REV_B, main=False)  # a second revision, other shapes
    return root, {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def recipe(tmp_path: Path, base: str, ft: str) -> Path:
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: fapm\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
                    "    parameters: {sparsity: 0.9}\ndtype: float32\n")
    return path


def test_validate_reads_hub_ids_from_the_cache(hub, tmp_path):
    _, env = hub
    result = run_tool("fapm-merge", "validate", recipe(tmp_path, "org/base", "org/ft"),
                      env=env, check=False)
    assert result.returncode == 0, result.stderr


def test_revision_picks_its_snapshot(hub, tmp_path):
    _, env = hub
    ok = run_tool("fapm-merge", "validate", recipe(tmp_path, "org/base", f"org/ft@{REV_A}"),
                  env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    wide = run_tool("fapm-merge", "validate", recipe(tmp_path, "org/base", f"org/ft@{REV_B}"),
                    env=env, check=False)
    assert wide.returncode != 0 and "mlp" in wide.stderr and "shape" in wide.stderr


def test_uncached_hub_id_is_explained_not_downloaded(hub, tmp_path):
    _, env = hub
    result = run_tool("fapm-merge", "validate", recipe(tmp_path, "org/base", "org/missing"),
                      env=env, check=False)
    assert result.returncode != 0
    for needle in ("'org/missing'", "neither a local folder", "Hugging Face cache",
                   "mergekit-yaml", "huggingface-cli download org/missing"):
        assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_run_offline_merges_cached_hub_ids_like_local_folders(hub, tmp_path):
    root, env = hub
    run_tool("fapm-merge", "run", recipe(tmp_path, "org/base", "org/ft"), tmp_path / "hub-out",
             "--no-copy-tokenizer", env=env)
    local = recipe(tmp_path, root / "local" / "base", root / "local" / "ft")
    run_tool("fapm-merge", "run", local, tmp_path / "local-out", "--no-copy-tokenizer", env=env)
    ours, expected = load_state(tmp_path / "hub-out"), load_state(tmp_path / "local-out")
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)
    # the difference we document: mergekit 0.1.5 asks the Hub even offline
    plain = run_tool("mergekit-yaml", recipe(tmp_path, "org/base", "org/ft"), tmp_path / "plain",
                     "--no-copy-tokenizer", env=env, check=False)
    assert plain.returncode != 0


@pytest.fixture(scope="module")
def lora(hub):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root, _ = hub
    model = LlamaForCausalLM.from_pretrained(root / "local" / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change something
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged-by-peft")
    return root / "adapter", root / "merged-by-peft"


def test_model_plus_lora_is_fapm_of_the_merged_fine_tune(hub, lora, tmp_path):
    root, env = hub
    adapter, merged = lora
    base = root / "local" / "base"
    run_tool("fapm-merge", "run", recipe(tmp_path, base, f"{base}+{adapter}"), tmp_path / "ours",
             "--no-copy-tokenizer", env=env)  # run supplies mergekit's LoRA merge cache itself
    run_tool("fapm-merge", "run", recipe(tmp_path, base, merged), tmp_path / "expected",
             "--no-copy-tokenizer", env=env)
    ours, expected = load_state(tmp_path / "ours"), load_state(tmp_path / "expected")
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    base_state = load_state(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[name], base_state[name])  # the adapter's change survives


def test_lora_targeting_absent_modules_is_refused(hub, lora, tmp_path):
    root, env = hub
    adapter, _ = lora
    bad = tmp_path / "bad-adapter"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["query_key_value"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    base = root / "local" / "base"
    result = run_tool("fapm-merge", "validate", recipe(tmp_path, base, f"{base}+{bad}"),
                      env=env, check=False)
    assert result.returncode != 0
    assert "'query_key_value'" in result.stderr and "does not have" in result.stderr


def test_inspect_takes_a_cached_hub_id(hub, tmp_path):
    _, env = hub
    result = run_tool("fapm-merge", "inspect", "org/base", f"org/ft@{REV_A}", "--no-plots", "-q",
                      "--out", tmp_path / "rep", env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rep" / "stats.json").is_file()


def test_online_run_leaves_uncached_hub_ids_to_mergekit(hub, tmp_path, monkeypatch, capsys):
    """validate refuses an uncached hub id; run's checks (online) warn and let mergekit fetch."""
    from huggingface_hub import constants

    from fapm_merge.recipe import RecipeError, check_recipe_file

    root, env = hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(env["HF_HOME"]) / "hub"))
    path = recipe(tmp_path, root / "local" / "base", "org/not-cached")
    with pytest.raises(RecipeError, match="neither a local folder"):
        check_recipe_file(str(path))
    check_recipe_file(str(path), allow_uncached=True)
    assert "mergekit will download it" in capsys.readouterr().err
