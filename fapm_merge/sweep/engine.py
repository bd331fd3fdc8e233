"""Every variant of a sweep built in memory, bit-identical to what ``mergekit-yaml`` writes.

How (and why it is exact):

- Planning is mergekit's own: each variant's recipe goes through ``MergePlanner`` (the same
  call ``mergekit.merge.run_merge`` makes), which resolves every tensor's parameters
  (``filter:`` overrides, layer gradients, precedence) into an ``ExecuteMergeMethodTask``.
  Inputs are loaded with that task's own ``LoadTensor`` sub-tasks (recipe ``dtype:`` cast
  included) and aligned with mergekit's ``align_dtype``; outputs are cast to the dtype
  ``SaveTensor`` would write (``out_dtype``).
- A tensor whose resolved FAPM parameters are an identity scaling (one fine-tune, weight 1,
  ``rescale: none``, ``lambda: 1``, a deterministic score) is, per the kernel,
  ``where(mask, W_ft, W_pre)`` with ``mask = kernel.prune_mask(...)``, and the masks of one
  score are nested in the sparsity (the top ``k`` of one fixed order: score descending, flat
  index ascending). So for each (tensor, score) the scores are computed **once**, the kernel's
  own ``keep_top_k`` selects the kept set at every sparsity the sweep will ask for, and the
  result is stored as one ``uint8`` *level* per element (the first sparsity, from the highest
  down, at which the element is kept). A variant is then ``W_ft`` where ``level <= j`` and
  ``W_pre`` elsewhere; going down in sparsity only *adds* elements of ``W_ft`` to the live
  model, so neither a copy of the base nor a new model is needed per variant.
- Every other tensor (and every DARE / WiSE-FT variant) runs mergekit's task itself
  (``ExecuteMergeMethodTask.execute``) on freshly loaded inputs: exact by construction.

Memory: the live ``transformers`` model (1x the model in its dtype) and the level maps (1 byte
per element of the tensors that take the fast path: 0.25x a float32 model, 0.5x a bfloat16
one). Base and fine-tune tensors are re-read through mergekit's loader when a variant needs them
(one pair in flight), and its memory-mapped shards are closed after each read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from fapm_merge.choices import DETERMINISTIC_SCORES
from fapm_merge.sweep.variants import SweepInputError, SweepRecipe, Variant, variant_recipe

LOG = logging.getLogger(__name__)
_MAX_LEVELS = 254  # sparsities per sweep: a level (one uint8 per element) counts them


@dataclass
class PlannedTensor:
    """One output tensor of a planned variant: mergekit's merge task and its save dtype."""

    name: str
    task: Any  # mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask
    save_dtype: Optional[str]
    optional: bool


def plan(config: dict, options=None) -> List[PlannedTensor]:
    """mergekit's plan of one recipe (dict): every output tensor, in mergekit's order."""
    import fapm_merge
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    fapm_merge.register()
    options = options or MergeOptions(quiet=True)
    merge_config = MergeConfiguration.model_validate(config)
    arch_info = get_architecture_info(merge_config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(merge_config, arch_info,
                                   trust_remote_code=options.trust_remote_code)
    # plan_to_disk is the planner's public entry point (plan_in_memory fails in 0.1.5); the
    # writer task it creates is never executed, so nothing is written to this path.
    tasks = MergePlanner(merge_config, arch_info, options=options,
                         out_model_config=out_config).plan_to_disk(out_path="/nonexistent")
    return [PlannedTensor(t.tensor_name, t.tensor_task, t.dtype, t.optional)
            for t in tasks if isinstance(t, SaveTensor)]


def load_inputs(task, release: bool = False, only=None) -> Dict[Any, Any]:
    """The inputs of one merge task, loaded exactly as mergekit's ``GatherTensors`` does.

    ``release``: close mergekit's open shards afterwards. Its loader keeps the current
    safetensors shard of every model memory-mapped, and the pages read through a mapping
    count in the process's resident memory; a sweep holds its models for minutes.
    ``only``: load this one model's tensor (a ``ModelReference``), not every model's.
    """
    from mergekit.io.tasks import GatherTensors, LoaderCache

    gather = task.gather_tensors
    if not isinstance(gather, GatherTensors):
        raise SweepInputError(
            f"tensor {task.output_weight.name}: the recipe realigns vocabularies "
            "(`tokenizer:`), which the in-memory sweep does not support; run with --low-memory")
    # GatherTensors.execute's own keys, restricted to ``only``
    models = {f"{model}:{info.name}": model for model, info in gather.weight_info.items()
              if only is None or model == only}
    loads = gather.arguments()
    loaded = {key: loads[key].execute() for key in models}
    inputs = {model: loaded[key] for key, model in models.items() if loaded[key] is not None}
    if release:
        inputs = {key: value.clone() for key, value in inputs.items()}
        LoaderCache().flush_all()
    return inputs


def _out_dtype(tensor, save_dtype: Optional[str]):
    from mergekit.common import dtype_from_name

    return dtype_from_name(save_dtype) if save_dtype else tensor.dtype


class InMemorySweep:
    """The live model and the state needed to turn it into any variant of one recipe.

    Args:
        recipe: the user's checked recipe.
        model: a ``transformers`` model of the base's architecture whose floating tensors
            have the merge's output dtype (see :func:`output_dtype`); its tensors are
            overwritten in place (``device_map`` / GPU placement is kept).
    """

    def __init__(self, recipe: SweepRecipe, model):
        self.recipe = recipe
        self.model = model
        self.targets = dict(model.named_parameters())
        self.targets.update(dict(model.named_buffers()))
        self.base_plan = plan(recipe.source)
        self.base_ref, self.ft_ref = self._references(self.base_plan)
        self._check_names(self.base_plan)
        self.state: Dict[str, Tuple] = {p.name: ("unknown",) for p in self.base_plan}
        self.levels: Dict[Tuple[str, str], Tuple[Any, List[float]]] = {}
        self.aligned: Dict[str, Any] = {}  # tensor name -> the inputs' aligned dtype
        self._plans: Dict[str, List[PlannedTensor]] = {}
        self.level_bytes = 0

    # ------------------------------------------------------------------ set-up
    def _references(self, planned: List[PlannedTensor]):
        task = planned[0].task
        base = task.base_model
        others = [m for m in task.model_order if m != base]
        return base, others[0]

    def _check_names(self, planned: List[PlannedTensor]) -> None:
        missing = [p.name for p in planned if p.name not in self.targets]
        if missing:
            raise SweepInputError(
                f"tensor {missing[0]!r} (and {len(missing) - 1} more) of the merge has no "
                "counterpart in the loaded transformers model (its checkpoint names differ "
                "from the module names); run the sweep with --low-memory")
        seen: Dict[int, str] = {}
        for p in planned:
            pointer = self.targets[p.name].data_ptr()
            if pointer in seen:
                raise SweepInputError(
                    f"tensors {seen[pointer]!r} and {p.name!r} share storage in the loaded "
                    "model (tied weights) but are merged separately; run with --low-memory")
            seen[pointer] = p.name

    def _plan(self, config: dict) -> List[PlannedTensor]:
        from fapm_merge.sweep.variants import _digest

        key = _digest(config)
        if key not in self._plans:
            planned = plan(config)
            if [p.name for p in planned] != [p.name for p in self.base_plan]:
                raise SweepInputError("a variant's recipe plans different tensors than the "
                                      "recipe; run with --low-memory")
            self._plans = {key: planned}  # one plan at a time: plans hold no tensors,
        return self._plans[key]           # but thousands of pydantic objects

    def _write(self, name: str, tensor) -> None:
        target = self.targets[name]
        if target.shape != tensor.shape or target.dtype != tensor.dtype:
            raise SweepInputError(
                f"tensor {name}: the merge gives {tuple(tensor.shape)} {tensor.dtype}, the "
                f"loaded model holds {tuple(target.shape)} {target.dtype}; run with "
                "--low-memory")
        target.data.copy_(tensor.to(target.device))

    # ------------------------------------------------------------------ references
    def set_reference(self, which: str) -> None:
        """Make the live model the pre-trained (``W_pre``) or fine-tuned (``W_ft``) model,
        each in the merge's output dtype, over every tensor the merge writes."""
        import torch

        model = self.base_ref if which == "pretrained" else self.ft_ref
        for planned in self.base_plan:
            source, dtype = self._load_one(planned, model)
            if source is None:  # an optional tensor this model lacks: mergekit's own output
                self._general(planned)
                continue
            with torch.no_grad():
                self._write(planned.name,
                            source.to(dtype).to(_out_dtype(source.to(dtype), planned.save_dtype)))
            self.state[planned.name] = ("base",) if which == "pretrained" else ("ft",)

    @staticmethod
    def _aligned_dtype(inputs: dict):
        from mergekit.merge_methods.base import TensorEntry, TensorGroup
        from mergekit.merge_methods.dtype import promoted_dtype

        group = TensorGroup(entries=tuple(
            TensorEntry(id=key, tensor=value, is_base=False) for key, value in inputs.items()))
        return promoted_dtype(group)

    # ------------------------------------------------------------------ variants
    def _fast_parameters(self, planned: PlannedTensor) -> Optional[Tuple[str, float]]:
        """(score, sparsity) when the tensor's resolved FAPM parameters are an identity
        scaling of one fine-tune with a deterministic score, else None."""
        task = planned.task
        if task.method_name != "fapm" or len(task.model_order) != 2:
            return None
        shared = dict(task.parameters.items())
        own = dict(task.input_parameters[self.ft_ref].items())
        identity = (shared["rescale"] == "none" and float(shared["lambda"]) == 1.0
                    and (shared["normalize"] or float(own["weight"]) == 1.0))
        if not identity or shared["score"] not in DETERMINISTIC_SCORES or shared["manifest"]:
            return None
        return shared["score"], own["sparsity"]

    def prepare(self, variants: Iterable[Variant]) -> None:
        """Compute the level maps for every sweep point to come (one pass per tensor and
        score): scores once, then the kernel's selection at each sparsity."""
        import torch

        from fapm_merge import kernel

        wanted: Dict[Tuple[str, str], set] = {}
        for variant in variants:
            if variant.kind != "sweep":
                continue
            for planned in self._plan(variant_recipe(self.recipe, variant)):
                fast = self._fast_parameters(planned)
                if fast is not None:
                    wanted.setdefault((planned.name, fast[0]), set()).add(fast[1])
        by_name = {p.name: p for p in self.base_plan}
        for (name, score), sparsities in wanted.items():
            known = self.levels.get((name, score))
            if known is not None and sparsities <= set(known[1]):
                continue
            order = sorted(sparsities | set(known[1] if known else ()), reverse=True)
            if len(order) > _MAX_LEVELS:
                raise SweepInputError(f"at most {_MAX_LEVELS} sparsities per sweep")
            inputs = self._load(by_name[name])
            base, finetuned = inputs.get(self.base_ref), inputs.get(self.ft_ref)
            if (base is None or finetuned is None or not base.is_floating_point()
                    or base.shape != finetuned.shape):
                continue  # the general path handles (or reports) these
            dtype = self.aligned[name] = self._aligned_dtype(inputs)
            with torch.no_grad():
                scores = kernel.score_task_vector(base.to(dtype), finetuned.to(dtype), score)
                del inputs, base, finetuned
                n = scores.numel()
                changed = n - int(torch.count_nonzero(scores == -float("inf")))
                # level = how many of the sparsities (highest first) do not keep the element:
                # the kept sets of one fixed total order are nested, so an element is kept at
                # sparsity ``order[j]`` exactly when ``level <= j``
                level = torch.zeros(n, dtype=torch.uint8)
                for sparsity in order:
                    # prune_mask's general path, with the scores computed once
                    k = kernel.kept_count(n, sparsity)
                    if k == n:
                        continue
                    if k == 0:
                        level += 1
                        continue
                    level += ~kernel.keep_top_k(scores.view(-1), min(k, changed))
                del scores
            if known is not None:
                self.level_bytes -= known[0].numel()
            self.levels[(name, score)] = (level, order)
            self.level_bytes += n
            # a tensor holding levels of an older map no longer matches: rebuild it from W_pre
            if self.state[name][0] == "level" and self.state[name][1] == score:
                self.state[name] = ("unknown",)

    def build(self, variant: Variant) -> None:
        """Turn the live model into ``variant`` (references included)."""
        if variant.kind == "reference":
            self.set_reference(variant.reference)
            return
        planned_tensors = self._plan(variant_recipe(self.recipe, variant))
        for planned in planned_tensors:
            fast = self._fast_parameters(planned) if variant.kind == "sweep" else None
            entry = self.levels.get((planned.name, fast[0])) if fast else None
            if entry is None or fast[1] not in entry[1]:
                self._general(planned)
                continue
            self._apply_level(planned, fast[0], entry, entry[1].index(fast[1]))

    def _apply_level(self, planned: PlannedTensor, score: str, entry, index: int) -> None:
        import torch

        level, _ = entry
        name = planned.name
        state = self.state[name]
        with torch.no_grad():
            if state[0] == "level" and state[1] == score and state[2] <= index:
                select = (level > state[2]) & (level <= index)
            else:
                if state[0] != "base":
                    self._reset_to_base(planned)
                select = level <= index
            if not bool(select.any()):
                self.state[name] = ("level", score, index)
                return
            finetuned, dtype = self._load_one(planned, self.ft_ref)
            finetuned = finetuned.to(dtype)
            finetuned = finetuned.to(_out_dtype(finetuned, planned.save_dtype))
            target = self.targets[name].data
            select = select.view(target.shape).to(target.device)
            torch.where(select, finetuned.to(target.device), target, out=target)
        self.state[name] = ("level", score, index)

    def _load(self, planned: PlannedTensor) -> Dict[Any, Any]:
        inputs = load_inputs(planned.task, release=True)
        if inputs and all(t.is_floating_point() for t in inputs.values()):
            self.aligned.setdefault(planned.name, self._aligned_dtype(inputs))
        return inputs

    def _load_one(self, planned: PlannedTensor, model):
        """(``model``'s tensor, the dtype mergekit aligns the inputs to): once the dtype is
        known only that model's tensor is read (half the reading of a variant's build)."""
        if planned.name in self.aligned:
            tensor = load_inputs(planned.task, release=True, only=model).get(model)
            return tensor, self.aligned[planned.name]
        inputs = self._load(planned)
        tensor = inputs.get(model)
        if tensor is None:
            return None, None
        return tensor, self.aligned.get(planned.name) or self._aligned_dtype(inputs)

    def _reset_to_base(self, planned: PlannedTensor) -> None:
        base, dtype = self._load_one(planned, self.base_ref)
        base = base.to(dtype)
        self._write(planned.name, base.to(_out_dtype(base, planned.save_dtype)))

    def _general(self, planned: PlannedTensor, inputs: Optional[dict] = None) -> None:
        """mergekit's own merge task on freshly loaded inputs (exact by construction)."""
        import torch
        from mergekit.common import dtype_from_name

        inputs = self._load(planned) if inputs is None else inputs
        with torch.no_grad():
            result = planned.task.execute(tensors=inputs)
            if result is None:
                raise SweepInputError(f"tensor {planned.name}: mergekit produced no value")
            if planned.save_dtype:
                result = result.to(dtype=dtype_from_name(planned.save_dtype))
            self._write(planned.name, result)
        self.state[planned.name] = ("other",)

    def state_dict(self) -> Dict[str, Any]:
        """The live tensors the merge writes, by mergekit's names (copies, on CPU)."""
        return {p.name: self.targets[p.name].detach().to("cpu").clone() for p in self.base_plan}


def output_dtype(recipe: SweepRecipe):
    """The dtype mergekit writes for the recipe's first floating tensor (``out_dtype``, else
    the dtype the method returns: the inputs' aligned dtype)."""
    from mergekit.common import dtype_from_name

    for planned in plan(recipe.source):
        inputs = load_inputs(planned.task, release=True)
        if not all(t.is_floating_point() for t in inputs.values()):
            continue
        if planned.save_dtype:
            return dtype_from_name(planned.save_dtype)
        return InMemorySweep._aligned_dtype(inputs)
    raise SweepInputError(f"{recipe.path}: the merge has no floating-point tensor")
