"""On-the-fly mode: forward hooks that add each batch row's expert term, base weights untouched.

One hook per module that an expert changes; it does nothing unless the calling thread is inside
``ExpertPool.route`` (a thread-local context), so threads can serve different mixes at once and merged mode
runs with no per-call cost. Per module and use (see :data:`deltahub.serving.binding.USES`):

- ``linear``/``conv1d``: the kernels' mixed-batch op, y_i += x_i·Δ_eᵀ (``conv1d`` holds Δᵀ, repacked at load);
- ``embedding``: y_i = round(y_i + Δ_e[ids_i]) from the packed rows, bit-exact with the merged lookup;
- ``bias``: y_i += Δb_e;
- ``other`` (LayerNorm and RMSNorm weights, anything else): the module is run again on expert e's rows with
  its merged parameters (a shallow copy that reads them), which is exact and cheap for these small modules;
- ``attached`` (a nonlinear adapter, Compacter): y_i = adapter_e(y_i), after every additive term.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from deltahub.errors import ModeError, UnservableExpertError
from deltahub.kernels import mixed_matmul_
from deltahub.kernels.matmul import LowRankBatch
from deltahub.kernels.rows import delta_rows

_local = threading.local()


@dataclass
class RouteContext:
    """The experts of one ``route`` call: ``index[i]`` is row i's position in ``versions`` (−1: the base)."""

    versions: list[Any]
    index: torch.Tensor
    plans: dict[str, list] = field(default_factory=dict)
    busy: bool = False
    batch: int | None = None  # rows of the model's input in the current forward (seen by the root pre-hook)

    def rows(self, lead: int, where: str) -> torch.Tensor:
        n = self.index.shape[0]
        if lead == n:
            return self.index
        if n and lead % n == 0:  # generate() expands each row for beams / num_return_sequences, in order
            return self.index.repeat_interleave(lead // n)
        raise ModeError(f"{where} ran on a batch of {lead} rows while {n} names are routed; "
                        "pass one name per batch row to pool.route.")


def current() -> RouteContext | None:
    return getattr(_local, "ctx", None)


def enter(ctx: RouteContext) -> None:
    if current() is not None:
        raise ModeError("This thread is already inside pool.route; nest no routes (route all rows at once).")
    _local.ctx = ctx


def leave() -> None:
    _local.ctx = None


class Hooks:
    """The forward hooks of one pool, installed per module as experts that change it arrive."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.root = model.register_forward_pre_hook(_see_batch, with_kwargs=True)
        self.handles: dict[str, Any] = {}
        self.owned: dict[str, list[tuple[str, str, str]]] = {}  # module path -> (slot name, attr, use)
        self.batches: dict[tuple, tuple[list, Any]] = {}  # (path, attr, resident ids) -> (residents, prepared)

    def cover(self, changes: list[Any]) -> None:
        """Hook every module that ``changes`` touch (checked whole first: nothing is hooked on an error).

        Raises:
            UnservableExpertError: a module served by running it again holds another changed module.
        """
        owned = {p: list(es) for p, es in self.owned.items()}
        for ch in changes:
            for path, attr, use in ch.slot.uses:
                entries = owned.setdefault(path, [])
                if (ch.slot.name, attr, use) not in entries:
                    entries.append((ch.slot.name, attr, use))
        rerun = [p for p, es in owned.items() if any(u == "other" for _, _, u in es)]
        for p in rerun:
            inner = next((q for q in owned if _inside(q, p)), None)
            if inner is not None:
                raise UnservableExpertError(
                    f"The pool serves module {p!r} by running it again with merged parameters, but {inner!r} inside "
                    "it changes too; serve this expert in merged mode (pool.activate) instead.")
        self.owned = owned
        for path in owned:
            if path not in self.handles:
                module = self.model.get_submodule(path)
                self.handles[path] = module.register_forward_hook(_make_hook(self, path), with_kwargs=True)

    def remove(self) -> None:
        self.root.remove()
        self.batches.clear()
        for h in self.handles.values():
            h.remove()
        self.handles.clear()
        self.owned.clear()

    def _lowrank(self, path: str, attr: str, per: list) -> Any:
        """LoRA experts on CPU: their factors concatenated once per mix of experts (kept across requests; the
        pool clears this when it drops residents), not per call: 10 ms of a 32 ms MiniLM batch otherwise."""
        tensor = getattr(self.model.get_submodule(path), attr)
        if tensor.device.type != "cpu":
            return per
        key = (path, attr, tuple(id(p) for p in per))
        hit = self.batches.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], per)):
            if len(self.batches) > 64 * max(1, len(self.owned)):  # many mixes: start over rather than grow
                self.batches.clear()
            hit = self.batches[key] = (per, LowRankBatch.build(per, x_dtype=tensor.dtype) or per)
        return hit[1]

    def plan(self, ctx: RouteContext, path: str) -> list[tuple[str, str, list]]:
        """(attr, use, per-version on-the-fly residents or None) for what the routed experts change here."""
        if path not in ctx.plans:
            out = []
            owned = self.owned.get(path, [])
            whole = any(use == "other" for _, _, use in owned)  # run again with merged params: every attr so
            for slot, attr, use in owned:
                use = "other" if whole else use
                per = [v.onfly(slot, use) for v in ctx.versions]
                if not any(p is not None for p in per):
                    continue
                if any(isinstance(p, torch.nn.Module) for p in per):  # attached adapters: run on the output
                    mods = [p if isinstance(p, torch.nn.Module) else None for p in per]
                    deltas = [None if isinstance(p, torch.nn.Module) else p for p in per]
                    if any(d is not None for d in deltas):
                        out.append((attr, use, self._lowrank(path, attr, deltas) if use in ("linear", "conv1d")
                                    else deltas))
                    out.append((attr, "attached", mods))
                    continue
                if use in ("linear", "conv1d") and not whole:
                    per = self._lowrank(path, attr, per)
                out.append((attr, use, per))
            ctx.plans[path] = out
        return ctx.plans[path]


def _inside(child: str, parent: str) -> bool:
    return child != parent and (parent == "" or child.startswith(parent + "."))


def _see_batch(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Note the batch rows of the model's own input (``input_ids``/``inputs_embeds``, else the first tensor)."""
    ctx = current()
    if ctx is None or ctx.busy:
        return
    first = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if first is None:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim()), None)
    ctx.batch = None if first is None else int(first.shape[0])


def _make_hook(hooks: Hooks, path: str) -> Any:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ctx = current()
        if ctx is None or ctx.busy:
            return None
        plan = hooks.plan(ctx, path)
        if not plan:
            return None
        if not isinstance(output, torch.Tensor):
            raise UnservableExpertError(f"Module {path!r} returns {type(output).__name__}, not a tensor; the pool "
                                        "cannot add per-row terms to it. Serve this expert in merged mode (activate).")
        x = args[0] if args else next(iter(kwargs.values()))
        if x.shape[0] == 1 and ctx.index.shape[0] > 1:
            # an input shared by every row (GPT-2's position ids are [1, seq]): give each row its own output
            rows = ctx.batch or ctx.index.shape[0]
            x, output = x.expand(rows, *x.shape[1:]), output.expand(rows, *output.shape[1:]).clone()
            args = (x, *args[1:]) if args else args
        idx = ctx.rows(x.shape[0], f"module {path!r}")
        with torch.no_grad():
            if any(use == "other" for _, use, _ in plan):
                _recompute(module, ctx, plan, idx, args, kwargs, output)
                return output
            for _attr, use, per in plan:
                if use == "attached":
                    continue  # after every additive term: the adapter sees the module's full output
                if use in ("linear", "conv1d"):
                    mixed_matmul_(output, x, idx, per)
                elif use == "embedding":
                    _rows_add(output, idx, per,
                              lambda layout, m: delta_rows(layout, x[m].reshape(-1)).reshape(*x[m].shape, -1))
                else:
                    _rows_add(output, idx, per, lambda db, m: db)
            for _attr, use, per in plan:
                if use == "attached":
                    for e in torch.unique(idx[idx >= 0]).tolist():
                        if per[e] is not None:
                            m = idx == e
                            output[m] = per[e](output[m]).to(output.dtype)
        return output

    return hook


def _rows_add(out: torch.Tensor, idx: torch.Tensor, per: list, term: Any) -> None:
    """out[rows of e] = round(out + term_e), the sum in the term's precision, for each expert e present."""
    for e in torch.unique(idx[idx >= 0]).tolist():
        if per[e] is None:
            continue
        m = idx == e
        t = term(per[e], m)
        out[m] = (out[m].to(t.dtype) + t).to(out.dtype)


def _recompute(module: torch.nn.Module, ctx: RouteContext, plan: list, idx: torch.Tensor, args: tuple,
               kwargs: dict, output: torch.Tensor) -> None:
    lead = idx.shape[0]
    for e in torch.unique(idx[idx >= 0]).tolist():
        params = {attr: per[e] for attr, _use, per in plan if per[e] is not None}
        if not params:
            continue
        m = idx == e
        cut = [a[m] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == lead else a for a in args]
        kw = {k: (v[m] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == lead else v)
              for k, v in kwargs.items()}
        ctx.busy = True
        try:
            output[m] = _with_params(module, params)(*cut, **kw)
        finally:
            ctx.busy = False


def _with_params(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A shallow copy of ``module`` that reads ``params`` instead of its own tensors.

    Not torch.func.functional_call: that swaps the tensors on the shared module for the call, and another
    thread's base rows running the same module meanwhile would read the expert's weights. The copy shares
    children and hooks (our hook skips it: ``ctx.busy``) and costs a few microseconds.
    """
    clone = copy.copy(module)
    clone._parameters = {**module._parameters, **{k: v for k, v in params.items() if k in module._parameters}}
    clone._buffers = {**module._buffers, **{k: v for k, v in params.items() if k in module._buffers}}
    return clone
