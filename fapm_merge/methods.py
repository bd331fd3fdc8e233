"""mergekit glue: the ``fapm`` and ``fapm_ties`` merge methods, declared and registered.

All the numerics live in :mod:`fapm_merge.kernel`; this module only declares the recipe
parameters (validated by mergekit at planning time, before any tensor is read) and unpacks
them per tensor.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal, Optional, Union

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import Field
from typing_extensions import Annotated

from fapm_merge import choices, kernel, manifest, native

PAPER_URL = "https://arxiv.org/abs/2509.08255"

Fraction01 = Annotated[float, Field(ge=0.0, le=1.0)]
ScoreName = Literal[choices.SCORES]  # Literal of a tuple: Literal["fapm", "magnitude", ...]
RescaleName = Literal[choices.RESCALES]
ConsensusName = Literal[choices.CONSENSUS]


class FapmMerge(GroupMergeMethod):
    """Prune every task vector by a base-aware score, then task arithmetic (or TIES)."""

    def __init__(self, name: str, pretty_name: str, consensus: bool):
        self.consensus = consensus
        parameters = [
            ParameterSpec("sparsity", Fraction01, ParameterScope.NON_BASE, default=0.9),
            ParameterSpec("weight", float, ParameterScope.NON_BASE, default=1.0),
            ParameterSpec("score", ScoreName, ParameterScope.SHARED, default="fapm"),
            ParameterSpec("rescale", RescaleName, ParameterScope.SHARED, default="none"),
            ParameterSpec("normalize", bool, ParameterScope.SHARED, default=consensus),
            ParameterSpec("lambda", float, ParameterScope.SHARED, default=1.0),
            ParameterSpec("seed", int, ParameterScope.SHARED, default=0),
            # Opt-in per-tensor pruning record (JSON lines); see fapm_merge.manifest.
            ParameterSpec("manifest", Union[bool, str], ParameterScope.SHARED, default=False),
        ]
        if consensus:
            parameters.append(
                ParameterSpec("consensus", ConsensusName, ParameterScope.SHARED, default="sum")
            )
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
            reference_url=PAPER_URL,
            parameters=tuple(parameters),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        fused_in_c = parameters["score"] == "fapm" and native.takes(base.dtype)
        if base.device.type == "cpu" and not fused_in_c:  # torch passes: busy cores hurt
            _warn_once_if_cores_busy()
        name = group.metadata.name or "<unnamed tensor>"
        generators = None
        if parameters["score"] == "random":
            generators = [
                kernel.tensor_generator(parameters["seed"], name, index, base.device)
                for index in range(len(entries))
            ]
        consensus: Optional[str] = parameters.get("consensus") if self.consensus else None
        try:
            merged = kernel.merge_task_vectors(
                base,
                [entry.tensor for entry in entries],
                sparsity=[parameters["sparsity"][entry.id] for entry in entries],
                weight=[parameters["weight"][entry.id] for entry in entries],
                score=parameters["score"],
                rescale=parameters["rescale"],
                normalize=parameters["normalize"],
                scale=parameters["lambda"],
                consensus=consensus,
                generators=generators,
            )
        except kernel.NonFiniteWeightsError:
            raise kernel.NonFiniteWeightsError(
                f"{self.spec.name}: tensor {name}: {_non_finite(group)}"
            ) from None
        manifest_path = manifest.target(parameters.get("manifest", False))
        if manifest_path:
            manifest.record(
                manifest_path,
                method=self.spec.name,
                tensor=name,
                base=base,
                finetuned=[entry.tensor for entry in entries],
                models=[str(entry.id) for entry in entries],
                sparsity=[parameters["sparsity"][entry.id] for entry in entries],
                score=parameters["score"],
                seed=parameters["seed"],
            )
        return merged


def busy_cores_advice(load: float, cores: int, threads: int) -> Optional[str]:
    """Advice when torch's intra-op threads will share busy cores, else None.

    The kernel's torch passes (FAPM without a C compiler, with ``FAPM_MERGE_NATIVE=0`` or on
    float16; the other scores' selection) are many short ops, each ending in a barrier of
    torch's threads: a thread that another job has descheduled stalls every one of them
    (docs/benchmarks.md, "Threads": 2-39x slower at 2 threads on 2 busy cores), where one
    thread is not slowed. FAPM's C pass hands out whole slices and is not slowed, so merges
    that take it get no advice. The kernel never changes the thread count itself
    (process-global), so it says so instead.
    """
    if threads <= 1 or load < cores:
        return None
    return (f"the CPU is busy (load {load:.1f} on {cores} cores) and torch runs {threads} "
            "threads: the kernel's torch passes slow down sharply when their threads share "
            "busy cores; pass --num-threads 1 to mergekit-yaml / fapm-merge run "
            "(docs/benchmarks.md, 'Threads')")


_checked_cores = False


def _warn_once_if_cores_busy() -> None:
    """At the first CPU tensor of a process: the load of the minute before (mostly other
    jobs, as this merge has only begun) against the cores and torch's threads."""
    global _checked_cores
    if _checked_cores or not hasattr(os, "getloadavg"):
        return
    _checked_cores = True
    advice = busy_cores_advice(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads())
    if advice:
        warnings.warn(advice, RuntimeWarning, stacklevel=2)


def _non_finite(group: TensorGroup) -> str:
    """Which checkpoint holds the NaN / inf (looked up only once the kernel has found one)."""
    culprits = [
        f"{role} {entry.id}"
        for role, entry in [("base model", group.base)] + [("fine-tune", e) for e in group.non_base]
        if not bool(torch.isfinite(entry.tensor).all())
    ]
    where = ", ".join(culprits) or "the task vector (overflow)"
    return f"NaN or infinite values in {where}; repair or re-save that checkpoint"


class LowRankMerge(GroupMergeMethod):
    """The rivals FAPM is measured against: each task vector reduced to a low rank, then
    summed with its weight (``spectral``: the Gavish-Donoho threshold picks the rank per
    tensor; ``lowrank``: a fixed ``rank``). The numerics are :mod:`fapm_merge.spectral`."""

    def __init__(self, name: str, pretty_name: str, fixed_rank: bool):
        self.fixed_rank = fixed_rank
        parameters = [ParameterSpec("weight", float, ParameterScope.NON_BASE, default=1.0)]
        if fixed_rank:
            parameters.append(ParameterSpec("rank", Annotated[int, Field(ge=1)],
                                            ParameterScope.SHARED, default=16))
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
            reference_url=SPECTRAL_URL,
            parameters=tuple(parameters),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        from fapm_merge import spectral

        entries = group.non_base
        try:
            return spectral.merge_low_rank(
                group.base.tensor, [entry.tensor for entry in entries],
                [parameters["weight"][entry.id] for entry in entries],
                parameters["rank"] if self.fixed_rank else None)
        except ValueError:
            name = group.metadata.name or "<unnamed tensor>"
            raise kernel.NonFiniteWeightsError(
                f"{self.spec.name}: tensor {name}: {_non_finite(group)}") from None


SPECTRAL_URL = "https://arxiv.org/abs/2605.20296"

METHODS = (
    FapmMerge("fapm", "FAPM (Forgetting-Aware Pruning Metric)", consensus=False),
    FapmMerge("fapm_ties", "FAPM + TIES sign consensus", consensus=True),
    LowRankMerge("spectral", "Spectral repair (Gavish-Donoho hard threshold)", fixed_rank=False),
    LowRankMerge("lowrank", "Low-rank task vector (truncated SVD)", fixed_rank=True),
)


def register_methods() -> None:
    """Make ``fapm``, ``fapm_ties``, ``spectral`` and ``lowrank`` available to mergekit by
    name; safe to call again."""
    known = {method.spec.name for method in registry.registered_methods()}
    for method in METHODS:
        if method.spec.name not in known:
            registry.register(method)


register_methods()
