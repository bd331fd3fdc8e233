"""``fapm-merge inspect`` and the merge manifest, against straightforward whole-tensor
reference computations on tiny generated models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import weakref
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fapm_merge import kernel
from fapm_merge.inspect import stats as inspection

SPARSITY = 0.9


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _llama(hidden=32, layers=2, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, ft (single file), ft_sharded (several shards + index) and their state dicts.

    The base has exact zeros (some changed by the fine-tune, some not); the fine-tune leaves
    ~3% of elements unchanged; the perturbation does not depend on |W_pre|, so FAPM and
    magnitude pruning disagree.
    """
    root = tmp_path_factory.mktemp("inspect_models")
    torch.manual_seed(0)
    model = _llama()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            if param.dim() == 2:
                param.view(-1)[:: 97] = 0.0  # exact zeros in W_pre
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for name, param in model.named_parameters():
            delta = torch.randn(param.shape, generator=generator) * 0.01
            delta[torch.rand(param.shape, generator=generator) < 0.03] = 0
            if param.dim() == 2:
                delta.view(-1)[:: 194] = 0.0  # half of the W_pre zeros stay unchanged
            param.add_(delta)
    model.save_pretrained(root / "ft")
    model.save_pretrained(root / "ft_sharded", max_shard_size="30KB")
    assert (root / "ft_sharded" / "model.safetensors.index.json").is_file()
    assert len(list((root / "ft_sharded").glob("*.safetensors"))) > 3
    return {
        "root": root,
        "base": root / "base",
        "ft": root / "ft",
        "ft_sharded": root / "ft_sharded",
        "base_sd": load_file(root / "base" / "model.safetensors"),
        "ft_sd": load_file(root / "ft" / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def inspected(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect_out")
    stats = inspection.inspect_models(
        models["base"], models["ft_sharded"], sparsity=SPARSITY, out=out, progress=False
    )
    return stats, out


# --------------------------------------------------------------------------------------------
# Reference: whole tensors, plain torch, float64 where it matters
# --------------------------------------------------------------------------------------------


def nearest_rank(values, q):
    """The ceil(q * N)-th smallest value."""
    ordered = torch.sort(values).values
    return ordered[max(1, math.ceil(q * len(ordered) - 1e-9)) - 1].item()


def reference(pairs):
    """Element-weighted statistics of the concatenation of (base, ft, fapm, magnitude)."""
    bs = [b.reshape(-1).float() for b, _, _, _ in pairs]
    ds = [(f.float() - b.float()).reshape(-1) for b, f, _, _ in pairs]
    fm = torch.cat([m.reshape(-1) for _, _, m, _ in pairs])
    mm = torch.cat([m.reshape(-1) for _, _, _, m in pairs])
    negative = []
    for b, d in zip(bs, ds):  # the FAPM score uses each tensor's own mean |W_pre|
        mean = b.double().abs().mean()
        with torch.no_grad():
            score = d.double().abs() - mean * d.double().abs() / b.double().abs()
        negative.append(score < 0)  # W_pre == 0, dW != 0: -inf; both 0: nan (not < 0)
    b, d = torch.cat(bs).double(), torch.cat(ds).double()
    valid = b != 0
    ratio = d.abs()[valid] / b.abs()[valid]
    energy = (d**2).sum()

    def kept(mask):
        keep_valid = mask & valid
        return {
            "energy": ((d**2)[mask].sum() / energy).item(),
            "ratio": (d.abs()[keep_valid] / b.abs()[keep_valid]).mean().item(),
            "count": int(mask.sum()),
        }

    return {
        "numel": b.numel(),
        "dw_abs_mean": d.abs().mean().item(),
        "ratio_mean": ratio.mean().item(),
        "ratio_max": ratio.max().item(),
        "quantiles": {q: nearest_rank(ratio, q) for q in inspection.QUANTILES},
        "negative": torch.cat(negative).double().mean().item(),
        "unchanged": (d == 0).double().mean().item(),
        "base_zero": int((~valid).sum()),
        "base_zero_changed": int(((~valid) & (d != 0)).sum()),
        "jaccard": int((fm & mm).sum()) / int((fm | mm).sum()),
        "fapm": kept(fm),
        "magnitude": kept(mm),
    }


def check(record, ref):
    assert record["numel"] == ref["numel"]
    assert record["dw_abs_mean"] == pytest.approx(ref["dw_abs_mean"], rel=1e-9)
    # ratios and squares are float32 element-wise (sums float64): float32 rounding
    assert record["ratio_mean"] == pytest.approx(ref["ratio_mean"], rel=1e-6)
    assert record["ratio_max"] == pytest.approx(ref["ratio_max"], rel=1e-6)
    for q, value in ref["quantiles"].items():  # log-histogram quantiles
        assert record[f"ratio_p{round(q * 100)}"] == pytest.approx(value, rel=0.0234)
    assert record["negative_score_share"] == pytest.approx(ref["negative"], abs=1e-12)
    assert record["unchanged_share"] == pytest.approx(ref["unchanged"], abs=1e-12)
    assert record["base_zero"] == ref["base_zero"]
    assert record["base_zero_changed"] == ref["base_zero_changed"]
    assert record["jaccard"] == pytest.approx(ref["jaccard"], rel=1e-12)
    for score in ("fapm", "magnitude"):
        assert record[f"kept_{score}"] == ref[score]["count"]
        assert record[f"energy_kept_{score}"] == pytest.approx(ref[score]["energy"], rel=1e-6)
        assert record[f"kept_ratio_mean_{score}"] == pytest.approx(ref[score]["ratio"], rel=1e-6)


def masks_of(models, name):
    b, f = models["base_sd"][name], models["ft_sd"][name]
    return (
        b,
        f,
        kernel.prune_mask(b, f, SPARSITY, score="fapm"),
        kernel.prune_mask(b, f, SPARSITY, score="magnitude"),
    )


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def test_per_tensor_statistics_match_reference(models, inspected):
    stats, _ = inspected
    assert {t["name"] for t in stats["tensors"]} == set(models["base_sd"])
    for record in stats["tensors"]:
        pair = masks_of(models, record["name"])
        check(record, reference([pair]))
        n = pair[0].numel()
        assert record["kept_budget"] == math.floor(n / 10 + 1e-9)
        assert record["shape"] == list(pair[0].shape)


def test_aggregates_are_element_weighted(models, inspected):
    stats, _ = inspected
    names = list(models["base_sd"])
    check(stats["summary"], reference([masks_of(models, n) for n in names]))
    for kind, record in stats["module_types"].items():
        group = [n for n in names if inspection.module_type(n) == kind]
        assert record["tensors"] == len(group)
        check(record, reference([masks_of(models, n) for n in group]))
    assert [row["layer"] for row in stats["layers"]] == [0, 1]
    for row in stats["layers"]:
        group = [n for n in names if f"layers.{row['layer']}." in n]
        check(row, reference([masks_of(models, n) for n in group]))
    outside = [n for n in names if "layers." not in n]
    check(stats["outside_layers"], reference([masks_of(models, n) for n in outside]))
    assert set(stats["module_types"]) >= {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm",
    }


def test_kernel_masks_agree_with_a_full_sort(models):
    """The statistics use kernel.prune_mask; spot-check it against a stable argsort here."""
    name = "model.layers.1.mlp.down_proj.weight"
    b, f, fapm, magnitude = masks_of(models, name)
    d = (f.float() - b.float()).reshape(-1)
    changed = d != 0
    k = min(b.numel() // 10, int(changed.sum()))
    for mask, score in (
        (fapm, d.abs() - b.abs().mean() * d.abs() / b.reshape(-1).abs()),
        (magnitude, d.abs()),
    ):
        score = torch.where(changed, torch.nan_to_num(score, neginf=-3e38), -math.inf)
        top = torch.argsort(score, descending=True, stable=True)[:k]
        ref = torch.zeros_like(changed)
        ref[top] = True
        assert int(mask.sum()) == k
        # exact: the two may differ only where float32 and float64 scores tie at the threshold
        threshold = score[top[-1]].item()
        ambiguous = (score - threshold).abs() <= 1e-5 * abs(threshold) + 1e-12
        assert bool(((ref ^ mask.reshape(-1)) <= ambiguous).all())


def test_sharded_and_single_file_agree(models, inspected):
    stats, _ = inspected
    single = inspection.inspect_models(
        models["base"], models["ft"], sparsity=SPARSITY, out=None, progress=False, plots=False
    )
    strip = lambda rows: [{k: v for k, v in r.items() if k != "dtype_finetuned"} for r in rows]
    assert strip(single["tensors"]) == strip(stats["tensors"])


def test_histogram_quantiles_on_known_values():
    tally = inspection.Tally(tensors=1)
    values = torch.logspace(-6, 3, 10_001, dtype=torch.float64)
    values = torch.cat([torch.zeros(5000, dtype=torch.float64), values])
    tally.hist += inspection._histogram(values)
    tally.ratio_max = values.max().item()
    for q in (0.1, 0.33, 0.5, 0.9, 0.99):
        assert tally.quantile(q) == pytest.approx(nearest_rank(values, q), rel=0.0234, abs=1e-12)
    assert tally.quantile(0.2) == 0.0  # inside the block of exact zeros


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_files_written_and_readable(inspected):
    import matplotlib.image as mpimg

    stats, out = inspected
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["schema_version"] == inspection.SCHEMA_VERSION == 1
    assert on_disk["tensors"] == stats["tensors"]
    for key in ("summary", "module_types", "layers", "outside_layers", "skipped", "heatmaps",
                "plots", "sparsity", "base", "finetuned", "ratio_histogram"):
        assert key in on_disk
    report = (out / "report.md").read_text()
    for heading in ("## Summary", "## Per module type", "## Per layer", "## Top-risk tensors"):
        assert heading in report
    assert "| down_proj |" in report and "| lm_head |" in report
    # default heatmaps: q_proj and down_proj of the first and last layer
    assert [h["tensor"] for h in on_disk["heatmaps"]] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    pngs = on_disk["plots"] + [h["file"] for h in on_disk["heatmaps"]]
    assert "layers.png" in pngs and "tradeoff.png" in pngs
    for file in pngs:
        image = mpimg.imread(out / file)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"({file})" in report


def test_heatmap_pooling_is_block_mean():
    base = torch.arange(1, 601, dtype=torch.float32).reshape(20, 30)
    ft = base + 1.0
    base[0, 0] = 0.0  # excluded from the ratio panel (NaN-aware mean)
    mask = torch.zeros_like(base, dtype=torch.bool)
    mask[:10, :15] = True
    data = inspection.heatmap_data(base, ft, {"fapm": mask}, max_side=8)
    br, bc = data["block"]
    assert (br, bc) == (3, 4)
    panels = data["panels"]
    assert panels["|W_pre|"].shape == (7, 8)
    assert panels["|W_pre|"][1, 1] == pytest.approx(base[3:6, 4:8].mean().item())
    assert panels["|W_pre|"][6, 7] == pytest.approx(base[18:20, 28:30].mean().item())
    ratio = (1.0 / base[0:3, 0:4].double()).reshape(-1)[1:]
    assert panels["|dW| / |W_pre|"][0, 0] == pytest.approx(ratio.mean().item())
    assert panels["fapm mask"][3, 3] == pytest.approx(mask[9:12, 12:16].double().mean().item())


def test_heatmap_option_and_modules_filter(models, tmp_path):
    stats = inspection.inspect_models(
        models["base"], models["ft"], sparsity=0.5, out=tmp_path, progress=False,
        modules=r"layers\.1\.", exclude="norm", heatmaps=["model.layers.1.mlp.up_proj.weight"],
    )
    assert all("layers.1." in t["name"] and "norm" not in t["name"] for t in stats["tensors"])
    assert [h["tensor"] for h in stats["heatmaps"]] == ["model.layers.1.mlp.up_proj.weight"]
    assert (tmp_path / stats["heatmaps"][0]["file"]).is_file()
    assert stats["outside_layers"] is None
    assert stats["summary"]["kept_budget"] == sum(t["numel"] // 2 for t in stats["tensors"])


def test_cli(models, tmp_path):
    from click.testing import CliRunner

    from fapm_merge.cli import main

    out = tmp_path / "report"
    result = CliRunner().invoke(
        main,
        ["inspect", str(models["base"]), str(models["ft"]), "--out", str(out), "--sparsity",
         "0.8", "--modules", "q_proj|down_proj", "--no-plots", "-q"],
    )
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sparsity"] == 0.8
    assert set(stats["module_types"]) == {"q_proj", "down_proj"}
    assert not list(out.glob("*.png"))
    missing = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope"), str(models["ft"])])
    assert missing.exit_code != 0 and "not found (looked in" in missing.output and "Traceback" not in missing.output


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _folder(path: Path, tensors: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_errors_name_the_problem(tmp_path):
    w = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4)}
    base = _folder(tmp_path / "base", w)
    with pytest.raises(inspection.InspectError, match="does not exist"):
        inspection.inspect_models(tmp_path / "missing", base, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(inspection.InspectError, match="no model.safetensors.*pytorch_model.bin"):
        inspection.inspect_models(base, tmp_path / "empty", progress=False)
    lacking = _folder(tmp_path / "lacking", {"a.weight": w["a.weight"] + 1})
    with pytest.raises(inspection.InspectError, match=r"b\.weight is in the base model.*--exclude"):
        inspection.inspect_models(base, lacking, progress=False)
    reshaped = _folder(tmp_path / "reshaped", {"a.weight": torch.randn(4, 5), "b.weight": w["b.weight"]})
    with pytest.raises(inspection.InspectError, match=r"a\.weight: shape \[4, 4\].*\[4, 5\]"):
        inspection.inspect_models(base, reshaped, progress=False)
    broken = _folder(tmp_path / "broken", {"a.weight": w["a.weight"] + 1, "b.weight": w["b.weight"]})
    index = {"weight_map": {"a.weight": "model.safetensors", "b.weight": "model-2.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(inspection.InspectError, match="model-2.safetensors is listed"):
        inspection.inspect_models(base, broken, progress=False)
    nan = _folder(tmp_path / "nan", {"a.weight": w["a.weight"] * math.nan, "b.weight": w["b.weight"]})
    with pytest.raises(inspection.InspectError, match=r"tensor a\.weight.*NaN"):
        inspection.inspect_models(base, nan, progress=False, plots=False)
    with pytest.raises(inspection.InspectError, match="no tensor name matches"):
        inspection.inspect_models(base, base, modules="q_proj", progress=False)


def test_non_floating_tensors_are_skipped(tmp_path):
    w = {"a.weight": torch.randn(8, 8), "position_ids": torch.arange(8)}
    base = _folder(tmp_path / "base", w)
    ft = _folder(tmp_path / "ft", {"a.weight": w["a.weight"] + 0.1, "position_ids": torch.arange(8)})
    stats = inspection.inspect_models(base, ft, out=tmp_path / "out", progress=False)
    assert [t["name"] for t in stats["tensors"]] == ["a.weight"]
    assert stats["skipped"] == [{"name": "position_ids", "reason": "not floating (I64/I64)"}]
    assert "position_ids" in (tmp_path / "out" / "report.md").read_text()


def test_bfloat16_and_all_zero_base(tmp_path):
    base = _folder(tmp_path / "base", {"w": torch.zeros(16, 16, dtype=torch.bfloat16)})
    ft = _folder(tmp_path / "ft", {"w": torch.randn(16, 16).to(torch.bfloat16)})
    stats = inspection.inspect_models(base, ft, progress=False, plots=False)
    record = stats["tensors"][0]
    assert record["dtype_base"] == "BF16"
    assert record["ratio_count"] == 0 and record["ratio_mean"] is None
    assert record["base_zero"] == 256 and record["negative_score_share"] == 0.0
    assert record["kept_fapm"] == 25 and record["energy_kept_fapm"] == pytest.approx(
        record["energy_kept_magnitude"]
    )


# --------------------------------------------------------------------------------------------
# Memory: tensors are streamed
# --------------------------------------------------------------------------------------------


def _many_shards(root: Path, name: str, shift: float, layers=64, side=256) -> Path:
    """A model of ``layers`` shards, each with 2 float32 matrices of side x side."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(7)
    weight_map = {}
    for layer in range(layers):
        file = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {}
        for kind in ("q_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.{kind}.weight"
            tensors[key] = torch.randn(side, side, generator=generator) + shift
            weight_map[key] = file
        save_file(tensors, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_at_most_two_loaded_tensors_alive(models, monkeypatch, tmp_path):
    """Instrument the loader: every tensor it returns is counted until it is freed."""
    live, peak, loads = [0], [0], [0]
    original = inspection._load_tensor

    def counting(path, name):
        tensor = original(path, name)
        live[0] += 1
        loads[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - 1))
        return tensor

    monkeypatch.setattr(inspection, "_load_tensor", counting)
    stats = inspection.inspect_models(  # heatmap data computed, nothing drawn (out=None)
        models["base"], models["ft_sharded"], out=None, progress=False
    )
    assert loads[0] == 2 * len(stats["tensors"])
    assert peak[0] == 2
    assert live[0] == 0


def test_peak_rss_is_a_few_tensors_not_the_model(tmp_path):
    """In a fresh process: peak RSS growth during the run stays well below the two models'
    size (2 x 32 MiB float32 in 64 shards each; one tensor is 256 KiB). Measured: ~10 MiB
    whatever the number of shards; holding either model whole would need >= 32 MiB."""
    base = _many_shards(tmp_path, "base", 0.0)
    ft = _many_shards(tmp_path, "ft", 0.01)
    model_bytes = sum(p.stat().st_size for p in (tmp_path).rglob("*.safetensors"))
    script = textwrap.dedent(
        f"""
        import resource, torch
        from fapm_merge.inspect import stats as inspection
        torch.set_num_threads(1)
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        inspection.inspect_models({str(base)!r}, {str(ft)!r}, modules="layers.0.mlp.q_proj",
                                  progress=False, plots=False)  # warm-up: allocator, threads
        before = rss()
        inspection.inspect_models({str(base)!r}, {str(ft)!r}, progress=False, plots=False)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
        with open("/proc/self/status") as f:
            peak = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0]
        print(before, peak)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    before, peak = map(int, result.stdout.split())
    growth = peak - before
    assert model_bytes > 64 * 2**20
    assert growth < model_bytes / 2, (growth, model_bytes)


# --------------------------------------------------------------------------------------------
# Merge manifest
# --------------------------------------------------------------------------------------------


def _merge(recipe: dict, out: Path) -> None:
    from fapm_merge.merging import merge

    merge(recipe, out)


def test_merge_manifest_from_recipe(models, tmp_path, monkeypatch):
    monkeypatch.delenv("FAPM_MANIFEST", raising=False)
    out = tmp_path / "merged"
    path = out / "fapm_manifest.jsonl"
    recipe = {
        "merge_method": "fapm",
        "base_model": str(models["base"]),
        "models": [{"model": str(models["ft_sharded"]), "parameters": {"sparsity": 0.8}}],
        "parameters": {"manifest": str(path)},
        "dtype": "float32",
    }
    _merge(recipe, out)
    from fapm_merge.manifest import read_manifest

    records = read_manifest(str(path))
    merged = load_file(out / "model.safetensors") if (out / "model.safetensors").exists() else {
        k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()
    }
    assert {r["tensor"] for r in records} == set(models["base_sd"]) == set(merged)
    for record in records:
        name = record["tensor"]
        b, f = models["base_sd"][name], models["ft_sd"][name]
        d = (f.float() - b.float()).double()
        (entry,) = record["finetuned"]
        kept = merged[name] != b  # what the merge actually kept (kept elements equal W_ft)
        assert entry["kept"] == int(kept.sum()) == min(b.numel() // 5, int((d != 0).sum()))
        assert entry["kept_budget"] == b.numel() // 5
        assert entry["energy_kept"] == pytest.approx(((d**2)[kept].sum() / (d**2).sum()).item())
        assert record["base_zero"] == int((b == 0).sum())
        assert entry["unchanged"] == int((d == 0).sum())
        assert entry["sparsity"] == 0.8 and record["method"] == "fapm"
        assert record["schema_version"] == 1


def test_merge_manifest_from_env_with_ties(models, tmp_path, monkeypatch):
    path = tmp_path / "env_manifest.jsonl"
    monkeypatch.setenv("FAPM_MANIFEST", str(path))
    recipe = {
        "merge_method": "fapm_ties",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ft"]), "parameters": {"sparsity": 0.9}},
            {"model": str(models["ft_sharded"]), "parameters": {"sparsity": 0.5}},
        ],
        "parameters": {"manifest": True, "score": "random", "seed": 3},
        "dtype": "float32",
    }
    _merge(recipe, tmp_path / "merged")
    from fapm_merge.manifest import read_manifest

    records = read_manifest(str(path))
    assert len(records) == len(models["base_sd"])
    for record in records:
        name = record["tensor"]
        b, f = models["base_sd"][name], models["ft_sd"][name]
        first, second = record["finetuned"]
        assert first["sparsity"] == 0.9 and second["sparsity"] == 0.5
        for index, entry in enumerate((first, second)):
            changed = int((f != b).sum())
            budget = math.floor((1 - Decimal(str(entry["sparsity"]))) * b.numel())
            assert entry["kept"] == min(budget, changed)  # the paper's count, not the kernel's
            assert 0.0 <= entry["energy_kept"] <= 1.0


def test_manifest_target_rules(monkeypatch):
    from fapm_merge.manifest import DEFAULT_FILE, target

    monkeypatch.delenv("FAPM_MANIFEST", raising=False)
    assert target(False) is None and target("") is None and target("off") is None
    assert target(True) == DEFAULT_FILE and target("true") == DEFAULT_FILE
    assert target("x/m.jsonl") == "x/m.jsonl"
    monkeypatch.setenv("FAPM_MANIFEST", "env.jsonl")
    assert target(False) == "env.jsonl" and target(True) == "env.jsonl"
    assert target("x/m.jsonl") == "x/m.jsonl"


def test_fapm_merge_run_manifest_lands_in_out(models, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fapm_merge.cli import main

    monkeypatch.setenv("FAPM_MANIFEST", "")  # restored afterwards: `run` sets it in-process
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: fapm\nbase_model: {models['base']}\n"
        f"models:\n  - model: {models['ft']}\n    parameters: {{sparsity: 0.9}}\n"
        "dtype: float32\n"
    )
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        main, ["run", str(recipe), str(out), "--manifest", "--no-copy-tokenizer",
               "--no-write-model-card", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    from fapm_merge.manifest import read_manifest

    records = read_manifest(str(out / "fapm_manifest.jsonl"))
    assert {r["tensor"] for r in records} == set(models["base_sd"])
