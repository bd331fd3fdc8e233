"""Data safety of `fapm-merge run` and whole-recipe validation (no silent ignores, no false
refusals). The user's disk may hold the only copy of their fine-tune."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import fine_tune_of, load_state, run_tool, save_model

from fapm_merge import output
from fapm_merge.cli import main

NO_CARD = ["--no-copy-tokenizer", "--no-write-model-card"]


def recipe_text(base, ft, method="fapm", extra="", model_extra="", params="sparsity: 0.9"):
    return (
        f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
        f"    parameters:\n      {params}\n{model_extra}dtype: float32\n{extra}"
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def models(tmp_path):
    root = tmp_path / "models"
    base = save_model(root / "base")
    fine_tune_of(base, root / "ft", seed=1)
    return root


# --------------------------------------------------------------------------- OUT and inputs


@pytest.mark.parametrize("target", ["models/base", "models", "models/ft/sub", "link-to-base"])
def test_run_force_refuses_out_over_inputs(models, tmp_path, target):
    (tmp_path / "link-to-base").symlink_to(models / "base")
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", models / "ft"))
    before = snapshot(models)
    result = invoke("run", "--force", recipe, tmp_path / target, *NO_CARD)
    assert result.exit_code != 0
    assert "input model" in result.output and "Traceback" not in result.output
    assert snapshot(models) == before


def test_run_refuses_out_holding_the_recipe(models, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    recipe = write(work / "r.yml", recipe_text(models / "base", models / "ft"))
    result = invoke("run", "--force", recipe, work, *NO_CARD)
    assert result.exit_code != 0 and "contains the recipe" in result.output
    assert recipe.exists()


def test_force_replaces_only_an_earlier_merge_output(models, tmp_path):
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", models / "ft"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my only copy")
    result = invoke("run", "--force", recipe, out, *NO_CARD)
    assert result.exit_code != 0
    assert "not an output of fapm-merge run" in result.output and "notes.txt" in result.output
    assert (out / "notes.txt").read_text() == "my only copy"

    (out / "notes.txt").unlink()
    assert invoke("run", recipe, out, *NO_CARD).exit_code == 0
    assert (out / output.MARKER).is_file()
    first = load_state(out)
    recipe.write_text(recipe_text(models / "base", models / "ft", params="sparsity: 0.5"))
    refused = invoke("run", recipe, out, *NO_CARD)
    assert refused.exit_code != 0 and "--force" in refused.output
    assert invoke("run", "--force", recipe, out, *NO_CARD).exit_code == 0
    second = load_state(out)
    changed = lambda state: sum(int((state[k] != first[k]).sum()) for k in state)  # noqa: E731
    assert changed(second) > 0  # replaced by the sparsity-0.5 merge
    assert not list(tmp_path.glob(".out.partial-*"))


def test_two_identical_runs_are_byte_identical_card_included(models, tmp_path):
    recipe = write(tmp_path / "r.yml", recipe_text(f"./{models.name}/base", f"./{models.name}/ft"))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "merged"
        run_tool("fapm-merge", "run", recipe, out, "--no-copy-tokenizer", cwd=tmp_path)
        outs.append(snapshot(out))
    assert outs[0] == outs[1]
    card = outs[0][Path("README.md")].decode()
    assert "# merged" in card and ".partial" not in card


def test_manifest_inside_out_ends_up_in_out_and_env_is_restored(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FAPM_MANIFEST", raising=False)
    recipe = write(tmp_path / "r.yml", recipe_text(
        models / "base", models / "ft", extra="parameters:\n  manifest: ./out/fapm_manifest.jsonl\n"
    ))
    result = invoke("run", recipe, tmp_path / "out", *NO_CARD)
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "out" / "fapm_manifest.jsonl").read_text().splitlines()
    assert len(lines) == len(load_state(models / "base"))
    assert list((tmp_path / "out").glob("*.safetensors"))
    # --manifest sets FAPM_MANIFEST for the merge only
    result = invoke("run", "--manifest", recipe.with_name("r.yml"), tmp_path / "out2", *NO_CARD)
    assert result.exit_code == 0, result.output
    assert "FAPM_MANIFEST" not in os.environ


def test_out_appearing_during_the_merge_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(output.OutputError, match="appeared while merging"):
        with output.staged(str(out), replace=False) as staging:
            (Path(staging.path) / "model.safetensors").write_text("merge")
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's")
            staging.commit()
    assert (out / "theirs.txt").read_text() == "someone else's"
    kept = list(tmp_path.glob("out.merged-*"))
    assert len(kept) == 1 and (kept[0] / "model.safetensors").read_text() == "merge"


# --------------------------------------------------------------------------- signals

SLOW_CHILD = (
    "import sys, time, mergekit.merge as m\n"
    "real = m.run_merge\n"
    "def slow(*a, **k):\n"
    "    real(*a, **k)\n"
    "    open(a[1] + '/.written', 'w').close()\n"
    "    time.sleep(120)\n"
    "m.run_merge = slow\n"
    "from fapm_merge.cli import main\n"
    "sys.exit(main())\n"
)


def start_slow_run(recipe: Path, out: Path) -> subprocess.Popen:
    """`fapm-merge run` in a child whose merge finishes, then hangs before the final move."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, "run", str(recipe), str(out), *NO_CARD],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # a test run started in the background (no job control) inherits SIGINT ignored, and
        # Python keeps an ignored SIGINT ignored: give the child the default a user's shell has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*/{out.name}/.written")):
        assert child.poll() is None, child.communicate()
        assert time.time() < deadline, "the child never finished its merge"
        time.sleep(0.05)
    return child


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_terminated_run_leaves_no_staging(models, tmp_path, signum):
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", models / "ft"))
    out = tmp_path / "out"
    child = start_slow_run(recipe, out)
    child.send_signal(signum)
    child.communicate(timeout=60)
    assert child.returncode != 0
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_killed_run_staging_is_removed_by_the_next_run(models, tmp_path):
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", models / "ft"))
    out = tmp_path / "out"
    child = start_slow_run(recipe, out)
    child.kill()
    child.communicate(timeout=60)
    assert list(tmp_path.glob(".out.partial-*")), "SIGKILL cannot clean up"
    result = invoke("run", recipe, out, *NO_CARD)
    assert result.exit_code == 0, result.output
    assert "left by an interrupted run" in result.output
    assert not list(tmp_path.glob(".out.partial-*")) and (out / output.MARKER).is_file()


# --------------------------------------------------------------------------- whole recipe


@pytest.mark.parametrize(
    "text, needles",
    [
        ("merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\n    paramters:\n"
         "      sparsity: 0.5\n", ["'models[0].paramters'", "Did you mean 'parameters'"]),
        ("merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\nsparsity: 0.5\n",
         ["'sparsity'", "Valid keys here"]),
        ("merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\ndtpye: float16\n",
         ["'dtpye'", "Did you mean 'dtype'"]),
        ("merge_method: ties\nbase_model: ./b\nslices:\n  - sources:\n      - model: ./a\n"
         "        layer_range: [0, 3]\n        paramters: {density: 0.5}\n",
         ["'slices[0].sources[0].paramters'", "Did you mean 'parameters'"]),
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters:\n"
         "      density:\n        - fitler: mlp\n          value: 0.5\n        - value: 0.3\n",
         ["'models[0].parameters.density[0].fitler'", "Did you mean 'filter'"]),
        ("merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\ndtype: flaot16\n",
         ["'flaot16'", "Did you mean 'float16'"]),
        ("merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters:\n"
         "      sparsity: yes\n", ["sparsity = True", "YAML boolean"]),
        ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters:\n"
         "      weight: no\n", ["weight = False", "YAML boolean"]),
    ],
)
def test_structural_mistakes_are_refused(tmp_path, text, needles):
    recipe = write(tmp_path / "r.yml", text)
    result = invoke("validate", "--no-model-check", recipe)
    assert result.exit_code != 0
    for needle in needles:
        assert needle in result.output, result.output


def test_boolean_parameters_still_take_booleans(tmp_path):
    recipe = write(tmp_path / "r.yml", "merge_method: fapm_ties\nbase_model: ./b\nmodels:\n"
                   "  - model: ./a\nparameters:\n  normalize: no\n  manifest: yes\n")
    result = invoke("validate", "--no-model-check", recipe)
    assert result.exit_code == 0, result.output


def test_invalid_value_message_has_no_empty_location(models, tmp_path):
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", models / "ft",
                                                   params="sparsity: 1.5"))
    result = invoke("validate", recipe)
    assert result.exit_code != 0 and "sparsity = 1.5 is invalid" in result.output
    assert ": :" not in result.output


# --------------------------------------------------------------------------- damaged files


def test_garbage_safetensors_is_named_not_a_memory_error(models, tmp_path):
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "config.json").write_bytes((models / "ft" / "config.json").read_bytes())
    (bad / "model.safetensors").write_bytes(b"\xff" * 64 + os.urandom(4096))
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", bad))
    for command in (["validate", recipe], ["run", recipe, tmp_path / "out", *NO_CARD]):
        result = invoke(*command)
        assert result.exit_code != 0
        assert "garbage/model.safetensors" in result.output
        assert "not a readable safetensors file" in result.output
        assert "MemoryError" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_fails_validate_naming_the_file(models, tmp_path):
    cut = tmp_path / "cut"
    fine_tune_of(models / "base", cut, seed=5)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 1000])
    result = invoke("validate", write(tmp_path / "r.yml", recipe_text(models / "base", cut)))
    assert result.exit_code != 0
    assert "cut/model.safetensors" in result.output and "truncated" in result.output


def test_index_naming_a_missing_shard(models, tmp_path):
    sharded = tmp_path / "sharded"
    fine_tune_of(models / "base", sharded, seed=6)
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}'
    )
    result = invoke("validate", write(tmp_path / "r.yml", recipe_text(models / "base", sharded)))
    assert result.exit_code != 0
    assert "model-00002-of-00002.safetensors" in result.output and "does not exist" in result.output
    assert "--no-model-check" in result.output


# --------------------------------------------------------------------------- false positives


def tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<unk>"] = vocab_size - 1
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def test_gpt2_with_added_tokens_merges_with_tokenizer_source_base(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    base = GPT2LMHeadModel(config)
    base.save_pretrained(tmp_path / "base")
    tokenizer = tiny_tokenizer(128)
    tokenizer.save_pretrained(tmp_path / "base")
    tokenizer.add_tokens([f"new{i}" for i in range(8)])
    ft = GPT2LMHeadModel(config)
    ft.load_state_dict(base.state_dict())
    ft.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for param in ft.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    ft.save_pretrained(tmp_path / "ft")
    tokenizer.save_pretrained(tmp_path / "ft")
    recipe = write(tmp_path / "r.yml", recipe_text("./base", "./ft", extra="tokenizer_source: base\n"))
    run_tool("mergekit-yaml", recipe, tmp_path / "plain", "--no-write-model-card", cwd=tmp_path)
    run_tool("fapm-merge", "run", recipe, tmp_path / "ours", "--no-write-model-card", cwd=tmp_path)
    ours, plain = load_state(tmp_path / "ours"), load_state(tmp_path / "plain")
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)
    assert ours["transformer.wte.weight"].shape[0] == 128


def test_tied_base_with_fine_tune_storing_lm_head(tmp_path):
    base = save_model(tmp_path / "base", tie_word_embeddings=True)
    state = load_state(base)
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.01
    save_model(tmp_path / "ft", state_dict={k: v + 0.001 for k, v in state.items()},
               tie_word_embeddings=False)
    assert "lm_head.weight" in load_state(tmp_path / "ft")
    recipe = write(tmp_path / "r.yml", recipe_text("./base", "./ft"))
    result = run_tool("fapm-merge", "validate", recipe, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    run_tool("mergekit-yaml", recipe, tmp_path / "plain", "--no-write-model-card", cwd=tmp_path)
    run_tool("fapm-merge", "run", recipe, tmp_path / "ours", "--no-write-model-card", cwd=tmp_path)
    ours, plain = load_state(tmp_path / "ours"), load_state(tmp_path / "plain")
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)


def test_hidden_size_mismatch_is_not_called_a_vocabulary_difference(models, tmp_path):
    save_model(tmp_path / "wider", hidden_size=48)
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", tmp_path / "wider"))
    result = invoke("validate", recipe)
    assert result.exit_code != 0
    assert "must come from this base" in result.output
    assert "vocabularies differ" not in result.output and "--no-model-check" in result.output


def test_vocabulary_hint_only_for_the_vocabulary_axis(models, tmp_path):
    save_model(tmp_path / "bigger-vocab", vocab_size=136)
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", tmp_path / "bigger-vocab"))
    result = invoke("validate", recipe)
    assert result.exit_code != 0
    assert "vocabularies differ" in result.output and "tokenizer: {source: base}" in result.output


def test_inspect_vocabulary_hint_only_for_the_vocabulary_axis(models, tmp_path):
    save_model(tmp_path / "wider", hidden_size=48)
    result = invoke("inspect", models / "base", tmp_path / "wider", "--out", tmp_path / "rep")
    assert result.exit_code != 0 and "must come from this base" in result.output
    assert "vocabularies differ" not in result.output


def test_no_model_check_lets_mergekit_decide(models, tmp_path):
    save_model(tmp_path / "wider", hidden_size=48)
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", tmp_path / "wider"))
    result = invoke("run", "--no-model-check", recipe, tmp_path / "out", *NO_CARD)
    assert result.exit_code != 0
    assert "merge failed, nothing written" in result.output  # mergekit's own error, reached
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_cuda_without_cuda_fails_before_any_work(models, tmp_path):
    recipe = write(tmp_path / "r.yml", recipe_text(models / "base", tmp_path / "missing"))
    result = invoke("run", "--cuda", recipe, tmp_path / "out", *NO_CARD)
    assert result.exit_code != 0
    assert "no CUDA" in result.output or "CPU-only" in result.output
    assert "not found" not in result.output  # refused before the recipe's models were read
