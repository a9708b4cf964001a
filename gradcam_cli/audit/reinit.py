"""Which modules the randomization metric re-initialises, their random weights, and swapping them in and out.

Execution order comes from one forward of a zero image (1, 3, H, W), without autograd, with a pre-hook on every
module: a module's place is the tick of its first call. The target layers fire at the tick of their forward
hook, or, for `MODULE:input`, of the module's pre-hook, so that module itself counts as after. A module with
state of its own (parameters or buffers, not counting its children's) is in the *head* when its first call comes
after the last target layer fired; modules that never run are in no step.

Blocks, for `--randomization cascade`: descending from the model through `nn.Sequential`, `nn.ModuleList` and
`nn.ModuleDict` containers, every module that is not such a container is one block (ResNet's `layer4.1`,
EfficientNet's `_blocks.15`, `_conv_head`, a VGG's `features.28`). After the head step the blocks are taken
top-down by the tick of their first call, each step re-initialising the stateful modules of one block that are
not re-initialised yet (blocks with nothing left are no step), cumulatively, as in Adebayo et al.'s cascade.

Random weights, as Quantus's `get_random_layer_generator`: for each module, `torch.manual_seed(seed + 1)` and
then `reset_parameters()`, on a deep copy of the module so the model is never written to; its own parameters
and buffers are kept (BatchNorm's reset also sets running_mean 0, running_var 1). A module without
`reset_parameters` keeps its weights (listed as `kept`). All of it inside `torch.random.fork_rng`, so the
caller's CPU and CUDA generators are as they were. The random tensors are made once per run; `swapped`
assigns them to `param.data` and to the module's buffer slots (pointer swaps, no copies) and always puts the
original tensors back, on an exception too.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from gradcam_cli.errors import GradcamError
from gradcam_cli.model.layers import INPUT_SUFFIX

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
Hook = torch.utils.hooks.RemovableHandle


def has_state(module: nn.Module) -> bool:
    """Whether the module holds parameters or buffers of its own (not counting its children's)."""
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def first_calls(
    model: nn.Module, targets: Mapping[str, nn.Module], input_size: tuple[int, int], device: torch.device
) -> tuple[dict[str, int], int]:
    """One forward of a zero image: each module's first-call tick by name, and the tick the last target fired."""
    ticks: dict[str, int] = {}
    fired = [-1]
    counter = [0]
    handles: list[Hook] = []

    def on_start(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: object) -> None:
            counter[0] += 1
            ticks.setdefault(name, counter[0])

        return hook

    def on_target(*_: object) -> None:
        counter[0] += 1
        fired[0] = counter[0]

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(on_start(name)))
        for name, module in targets.items():
            if name.endswith(INPUT_SUFFIX):
                # before the module's own start hook: the module itself is then after the target
                handles.append(module.register_forward_pre_hook(on_target, prepend=True))
            else:
                handles.append(module.register_forward_hook(on_target))
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return ticks, fired[0]


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks by name: the non-container modules reached through containers from the model."""
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, CONTAINERS):
                walk(full, child)
            else:
                found.append((full, child))

    walk("", model)
    return found


def head_modules(model: nn.Module, ticks: Mapping[str, int], fired: int) -> list[str]:
    """Names of the stateful modules whose first call comes after tick `fired`, in execution order."""
    after = [n for n, m in model.named_modules() if has_state(m) and ticks.get(n, -1) > fired]
    return sorted(after, key=lambda n: ticks[n])


def cascade_steps(model: nn.Module, ticks: Mapping[str, int], done: set[str]) -> list[tuple[str, list[str]]]:
    """(block name, its stateful modules not in `done`) per block, top-down by first call; empty blocks dropped."""
    ran = sorted((b for b in blocks(model) if b[0] in ticks), key=lambda b: -ticks[b[0]])
    steps = []
    for name, block in ran:
        names = [f"{name}.{n}" if n else name for n, m in block.named_modules() if has_state(m)]
        fresh = [n for n in names if n not in done]
        done.update(fresh)
        if fresh:
            steps.append((name, fresh))
    return steps


@dataclass
class RandomState:
    """One module's random parameters and buffers by attribute name, ready to swap in."""

    module: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]

    def swap_in(self, undo: list[Callable[[], None]]) -> None:
        """Point the module's parameters' data and its buffer slots at the random tensors; for each swap done,
        append to `undo` the call that reverts it."""
        for name, tensor in self.params.items():
            param = self.module._parameters[name]
            assert param is not None
            original = param.data
            param.data = tensor
            undo.append(partial(setattr, param, "data", original))
        for name, tensor in self.buffers.items():
            slots = self.module._buffers
            original_buffer = slots[name]
            slots[name] = tensor
            undo.append(partial(slots.__setitem__, name, original_buffer))


def random_state(module: nn.Module, seed: int) -> RandomState:
    """The module's own tensors after `torch.manual_seed(seed + 1); reset_parameters()` on a deep copy."""
    clone = copy.deepcopy(module)
    torch.manual_seed(seed + 1)
    clone.reset_parameters()  # type: ignore[operator]
    params = {n: p.detach() for n, p in clone._parameters.items() if p is not None}
    buffers = {n: b for n, b in clone._buffers.items() if b is not None}
    return RandomState(module, params, buffers)


@dataclass
class RandomWeights:
    """The random states of every step: `names[s]` the modules step s re-initialises, `kept` those of the steps
    without `reset_parameters` (left as they are)."""

    names: list[list[str]]
    states: list[list[RandomState]]
    kept: list[str]

    @staticmethod
    def prepare(model: nn.Module, steps: Sequence[Sequence[str]], seed: int, device: torch.device) -> RandomWeights:
        """Random tensors for each step's modules, made under a forked RNG (the caller's is untouched)."""
        modules = dict(model.named_modules())
        names: list[list[str]] = []
        states: list[list[RandomState]] = []
        kept: list[str] = []
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            for step in steps:
                resettable = [n for n in step if callable(getattr(modules[n], "reset_parameters", None))]
                kept += [n for n in step if n not in resettable]
                names.append(resettable)
                states.append([random_state(modules[n], seed) for n in resettable])
        return RandomWeights(names, states, kept)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[Callable[[int], None]]:
        """Yields `randomise(step)`, which swaps that step's random tensors in (steps accumulate); on leaving,
        however it is left, every original tensor is put back, last swapped first."""
        undo: list[Callable[[], None]] = []

        def randomise(step: int) -> None:
            for state in self.states[step]:
                state.swap_in(undo)

        try:
            yield randomise
        finally:
            for revert in reversed(undo):
                revert()


@dataclass(frozen=True)
class RandomizationPlan:
    """What the randomization metric re-initialises: the head's modules and, for a cascade, the blocks after it
    (`steps[0]` is the head, named `head`)."""

    step_names: list[str]
    weights: RandomWeights


def plan_randomization(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    input_size: tuple[int, int],
    device: torch.device,
    seed: int,
    cascade: bool,
) -> RandomizationPlan:
    """Find the head (and the cascade's blocks) by one probe forward and make their random weights."""
    ticks, fired = first_calls(model, targets, input_size, device)
    if fired < 0:
        raise GradcamError(f"--metrics randomization: layer {', '.join(targets)} was not used by the forward pass")
    head = head_modules(model, ticks, fired)
    modules = dict(model.named_modules())
    if not any(callable(getattr(modules[n], "reset_parameters", None)) for n in head):
        layer = ", ".join(targets)
        raise GradcamError(
            f"--metrics randomization: no module with reset_parameters() and weights runs after layer {layer}, "
            "nothing to re-initialise; choose an earlier --layer"
        )
    steps: list[tuple[str, list[str]]] = [("head", head)]
    if cascade:
        steps += cascade_steps(model, ticks, set(head))
    weights = RandomWeights.prepare(model, [s[1] for s in steps], seed, device)
    return RandomizationPlan([s[0] for s in steps], weights)
