"""Live tensor memory of one traced training step, by category, on fake or real tensors.

A TorchDispatchMode that sees every op's outputs, keeps each new storage's size until the storage is
freed (a weakref callback), and records the highest total and its split. It works the same on
FakeTensors (no data, only sizes) and on real tensors. We do not use
`torch.distributed._tools.mem_tracker.MemTracker`: it re-walks every tracked module on every op
(`_update_peak_stats`), which made a FLUX.1-dev step take minutes on this CPU; this one is O(1) per op.

Categories (the `breakdown_gib` keys):
  weights      frozen parameters and buffers (registered before the step)
  lora         trainable parameters (registered before the step)
  optimizer    AdamW state (registered before the step; the estimator warms it up first)
  grads        a storage becomes a gradient when its parameter's post-accumulate-grad hook fires
  activations  created before backward starts: saved activations and the forward's live tensors
  transient    created during backward, gradient clipping and the optimizer step (temporaries,
               recomputed activations under gradient checkpointing)
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("weights", "lora", "grads", "optimizer", "activations", "transient")


class LiveMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[Any]] = {}  # id(storage) -> [nbytes, category, weakref]
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_split = dict(self.totals)
        self.backward_started = False
        self._hooks: list[Any] = []
        self.on_backward: Any = None  # called once, when the autograd engine runs its first op

    # -- registration of what exists before the step ------------------------------------------------
    def register(self, t: torch.Tensor, category: str) -> None:
        """Track `t`'s storage under `category`, or move it there when it is already tracked."""
        st = t.untyped_storage()
        entry = self.live.get(id(st))
        if entry is None:
            self._add(st, category)
        elif entry[1] != category:
            self.totals[entry[1]] -= entry[0]
            self.totals[category] += entry[0]
            entry[1] = category

    def register_trainer(self, module: torch.nn.Module, params: list[torch.nn.Parameter],
                         opt: torch.optim.Optimizer) -> None:
        trainable = {id(p) for p in params}
        for p in module.parameters():
            self.register(p, "lora" if id(p) in trainable else "weights")
        for b in module.buffers():
            self.register(b, "weights")
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    self.register(v, "optimizer")
        for p in params:  # a gradient is known once autograd has accumulated it into .grad
            self._hooks.append(p.register_post_accumulate_grad_hook(lambda q: self.register(q.grad, "grads")))
        self._note_peak()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _add(self, st: torch.UntypedStorage, category: str) -> None:
        nbytes = st.nbytes()
        key = id(st)
        entry = [nbytes, category, None]
        entry[2] = weakref.ref(st, lambda _ref, key=key, entry=entry: self._free(key, entry))
        self.live[key] = entry
        self.totals[category] += nbytes
        self.current += nbytes

    def _free(self, key: int, entry: list[Any]) -> None:
        if self.live.get(key) is entry:
            del self.live[key]
            self.totals[entry[1]] -= entry[0]
            self.current -= entry[0]

    def _note_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.peak_split = dict(self.totals)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if not self.backward_started and torch._C._current_graph_task_id() != -1:
            self.backward_started = True  # the autograd engine is running: everything from here is backward+
            if self.on_backward is not None:
                self.on_backward()
        category = "transient" if self.backward_started else "activations"
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                st = t.untyped_storage()
                if id(st) not in self.live:
                    self._add(st, category)
        self._note_peak()
        return out


class ScalarReads(TorchDispatchMode):
    """Answer data-dependent scalar reads on fake tensors (`float(loss)`, AdamW's step count) with 1.0.

    A fake tensor has no value; these reads change no shape and allocate nothing, so any number will do.
    `count` says how many were answered, so the estimator can report it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        from torch._subclasses.fake_tensor import DataDependentOutputException

        try:
            return func(*args, **(kwargs or {}))
        except DataDependentOutputException:
            self.count += 1
            return 1.0
