"""Per-sample task conditioning: which task (``task_ids``) or conditioning vector (``task_embeds``) each sample uses.

FiLM, HyperMod and multi-task HadaIA3 read the conditioning of the current forward from here. It travels beside the
model call, not through it (transformers models do not pass unknown kwargs down to their linear layers):

* ``with hadapeft.conditioning(model, task_ids=ids):`` validates the tensors against the model's active conditioned
  adapters and sets them for the block, in a ``ContextVar`` keyed by the model (thread- and task-local: two threads
  running one model with different ids do not mix);
* ``model(**batch, task_ids=ids)`` / ``model.generate(..., task_ids=ids)`` on a PeftModel do the same
  (``hadapeft.seam.peft_model`` routes the kwargs here through :func:`for_call`), and so does the base model's own
  forward once it holds a conditioned adapter (:class:`ConditionedForward`, which the HF Trainer reads);
* a layer asks :meth:`ConditioningState.current` for its adapter's conditioning and maps it to its input rows with
  :meth:`Conditioning.per_row` (``generate`` expands a batch of B to B·k rows for beam search / several return
  sequences by ``repeat_interleave``, so row r belongs to sample r // k).

Within one ``generate`` call the conditioning of the batch is fixed, so what is computed from it per sample (FiLM's
``task_embeds`` generator, HyperMod's hypernetwork) runs once for the call, at the prefill, not once per new token:
:meth:`Conditioning.once_per_generate`, a cache that lives in the call's :func:`generating` scope and only with
gradients off; training, plain forwards and compiled code compute it every time.

Under ``torch.compile`` the ``ContextVar`` is replaced by a plain attribute of the model's :class:`ConditioningState`
(dynamo cannot trace ``ContextVar``; the conditioning tensors become graph inputs), so a compiled model is one graph
with conditioning passed as kwargs or through ``hadapeft.conditioning`` (there per model, not per thread). Task ids are range-checked without reading
them back to the host from a device (``.item()`` would sync CUDA and break CUDA-graph capture): on a CPU tensor the
check reads its memory directly; on CUDA and under compile it is a device-side assertion.

Gradient checkpointing recomputes the forward inside backward, after the block has exited (and, on CUDA, on
autograd's own threads, which do not see the ContextVar). So the conditioning of the last forward run with grad
enabled is also kept on the model's :class:`ConditioningState` and used for any layer that runs inside backward.
Limitation: two checkpointed forwards with different conditioning before one backward (summed losses) would recompute
the first with the second's conditioning; call backward per forward (as gradient accumulation does).
"""

from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import ConditioningError
from ..seam.hooks import assert_async
from ..seam.hooks import in_backward as _in_backward

# Attribute of the (transformers) base model that holds its ConditioningState; found through PeftModel and tuner too,
# since both forward unknown attributes to the model they wrap.
STATE_ATTR = "_hadapeft_conditioning"


@dataclass(frozen=True)
class ConditioningSpec:
    """What one conditioned adapter takes: a table of ``num_tasks`` rows or a ``task_embed_dim``-wide vector."""

    peft_type: str
    num_tasks: Optional[int] = None
    task_embed_dim: Optional[int] = None

    def describe(self, name: str) -> str:
        what = f"num_tasks={self.num_tasks}" if self.num_tasks else f"task_embed_dim={self.task_embed_dim}"
        return f"adapter {name!r} ({self.peft_type}, {what})"


@dataclass(frozen=True)
class Conditioning:
    """Validated conditioning of one batch: task_ids (B,) long and/or task_embeds (B, d) float."""

    task_ids: Optional[torch.Tensor] = None
    task_embeds: Optional[torch.Tensor] = None
    # Row indices per (kind, device, rows), computed once per forward instead of once per layer (on CUDA each would
    # be a host-to-device copy).
    _rows: dict = field(default_factory=dict, compare=False, repr=False)
    # Per-forward results shared by the layers (HyperMod's hypernetwork outputs for all layers), keyed by the code
    # that stores them; see HyperModModel.
    shared: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def batch(self) -> int:
        return (self.task_ids if self.task_ids is not None else self.task_embeds).shape[0]

    def per_row(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """Expand a per-sample tensor (B, ...) to the ``rows`` input rows of a layer: B, or B·k inside ``generate``
        (its beam / num_return_sequences expansion is ``repeat_interleave``). Anywhere else a layer that receives
        another number of rows gets conditioning meant for another batch: refused."""
        B = self.batch
        if rows == B:
            return t
        if rows < B or rows % B or _GENERATING.get() is None:
            raise ConditioningError(f"the conditioning has {B} samples but an adapted layer received {rows} rows: "
                                    f"task_ids / task_embeds need one entry per sample of the batch (only "
                                    f"generate's own beam / num_return_sequences expansion repeats them)")
        return t.repeat_interleave(rows // B, dim=0)

    def once_per_generate(self, key, compute: Callable[[], Any]):
        """``compute()``, run once per ``generate`` call for this conditioning: the per-sample results of the
        conditioning (FiLM's generator outputs, HyperMod's hypernetwork outputs) do not change from one new token to
        the next, so the prefill computes them and every decoding step of the same call reuses them. Beam search /
        num_return_sequences expand the batch to B·k rows once, before the prefill, and beam reordering keeps each
        sample's beams within its block of k rows: per-sample results stay valid (:meth:`per_row` maps them to the
        rows at each step). ``key`` names the result (and the module computing it).

        Only inside a model's ``generate`` with gradients off (generate's own ``torch.no_grad``) and outside
        ``torch.compile``; anywhere else (training, a plain forward, gradient checkpointing) ``compute()`` runs every
        time. The results live in the call's :func:`generating` scope and are dropped when the call returns, so a
        weight update between two calls is always seen."""
        generation = _GENERATING.get() if not torch.compiler.is_compiling() else None
        if generation is None or torch.is_grad_enabled():
            return compute()
        hit = generation.get((id(self), key))
        if hit is not None and hit[0] is self:  # the conditioning object itself is kept: its id is not reused
            return hit[1]
        value = compute()
        generation[(id(self), key)] = (self, value)
        return value

    def task_rows(self, rows: int, device) -> torch.Tensor:
        """(rows,) table index: the task of each input row."""
        key = ("task", device, rows)
        if key not in self._rows:
            self._rows[key] = self.per_row(self.task_ids.to(device), rows)
        return self._rows[key]

    def sample_rows(self, rows: int, device) -> torch.Tensor:
        """(rows,) index into per-sample tables (B, ...): the sample of each input row."""
        key = ("sample", device, rows)
        if key not in self._rows:
            self._rows[key] = self.per_row(torch.arange(self.batch, device=device), rows)
        return self._rows[key]


_CURRENT: ContextVar[tuple] = ContextVar("hadapeft_conditioning", default=())  # ((state, Conditioning), ...)
# Inside a model's generate(): the call's cache of per-sample results (Conditioning.once_per_generate); else None.
_GENERATING: ContextVar[Optional[dict]] = ContextVar("hadapeft_generating", default=None)


class ConditioningState:
    """Per adapted model: its conditioned adapters, which adapters are active, the conditioning kept for
    recomputation inside backward and the tasks merged into the weights. Layers and tuner hold a reference; it is a
    plain object (not a module)."""

    def __init__(self) -> None:
        self.specs: dict[str, ConditioningSpec] = {}
        self.active: list[str] = []
        self.last: Optional[Conditioning] = None  # of the last forward entered with grad enabled
        # The current conditioning as a plain attribute, for compiled code (which cannot read the ContextVar). Set by
        # every ``conditioning`` block, so it is per model, not per thread, under torch.compile.
        self.traced: Optional[Conditioning] = None
        self.merged: dict[str, Conditioning] = {}  # conditioned adapter -> the one task merged into its layers
        self.disabled = False  # adapters disabled (``with model.disable_adapter():``): the base model runs
        # Whether a conditioned adapter was ever added: then task_ids / task_embeds are ignored while none is active
        # (disabled, another adapter set, deleted), so code that passes the same batch with and without the adapter
        # works; a model that never had one refuses them (they could never do anything there).
        self.ever_conditioned = False

    def add_spec(self, name: str, spec: ConditioningSpec) -> None:
        self.specs[name] = spec
        self.ever_conditioned = True

    def snapshot(self):
        """A function that puts this state back as it is now (``hadapeft.seam.tuner.ModelUndo``)."""
        saved = dict(self.__dict__)
        specs, active, merged = dict(self.specs), list(self.active), dict(self.merged)

        def restore():
            self.__dict__.update(saved)
            self.specs.clear()
            self.specs.update(specs)
            self.active[:] = active
            self.merged.clear()
            self.merged.update(merged)
        return restore

    def needed(self, adapters: Optional[list[str]] = None) -> dict[str, ConditioningSpec]:
        names = self.active if adapters is None else adapters
        return {n: self.specs[n] for n in names if n in self.specs}

    def ignores_conditioning(self) -> bool:
        """True when given task_ids / task_embeds have nothing to condition and are to be ignored (see
        ``ever_conditioned``)."""
        return self.ever_conditioned and (self.disabled or not self.needed())

    def current(self, name: str) -> Conditioning:
        """The conditioning adapter ``name`` must use now (raises when there is none or it lacks what it needs)."""
        if torch.compiler.is_compiling():
            in_backward, cond = False, self.traced
        else:
            in_backward = _in_backward()  # a gradient-checkpointing recompute
            cond = self.last if in_backward else next((c for s, c in _CURRENT.get() if s is self), None)
        spec = self.specs[name]
        arg, shape = ("task_ids", "LongTensor[batch]") if spec.num_tasks else \
            ("task_embeds", f"FloatTensor[batch, {spec.task_embed_dim}]")
        if cond is None or getattr(cond, arg) is None:
            when = " (recomputed in backward: no conditioned forward ran with grad enabled)" if in_backward else ""
            raise ConditioningError(f"{spec.describe(name)} is conditioned per sample but no {arg} were given{when}: "
                                    f"pass {arg}={shape} to forward / generate, or run the model inside "
                                    f"`with hadapeft.conditioning(model, {arg}=...)`. From a dataset column: TRL's "
                                    f"own trainers (trl.SFTTrainer, trl.DPOTrainer) and collators drop task columns; "
                                    f"train with hadapeft.SFTTrainer / hadapeft.DPOTrainer, which carry them")
        return cond


def find_state(model) -> ConditioningState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ConditioningError(f"{type(model).__name__} holds no hadapeft adapter to condition")
    return state


def _check_ids(task_ids, needed) -> torch.Tensor:
    if not isinstance(task_ids, torch.Tensor):
        raise ConditioningError(f"task_ids must be a LongTensor of shape (batch,), got {type(task_ids).__name__}")
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise ConditioningError(f"task_ids must be an integer (long) tensor, got dtype {task_ids.dtype}")
    if task_ids.dim() != 1:
        raise ConditioningError(f"task_ids must be 1-D (one task per sample), got shape {tuple(task_ids.shape)}")
    task_ids = task_ids.long()
    tables = {name: spec for name, spec in needed.items() if spec.num_tasks}
    if not task_ids.numel() or not tables:
        return task_ids
    if task_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        values = task_ids.detach().numpy()  # reads the memory: no aten op, no sync
        lo, hi = int(values.min()), int(values.max())
        for name, spec in tables.items():
            if lo < 0 or hi >= spec.num_tasks:
                raise ConditioningError(f"task_ids out of range for {spec.describe(name)}: got values in "
                                        f"[{lo}, {hi}], expected [0, {spec.num_tasks - 1}]")
        return task_ids
    for name, spec in tables.items():
        assert_async(((task_ids >= 0) & (task_ids < spec.num_tasks)).all(),
                     f"task_ids out of range for {spec.describe(name)}: expected [0, {spec.num_tasks - 1}]")
    return task_ids


def _check_embeds(task_embeds, needed) -> torch.Tensor:
    if not isinstance(task_embeds, torch.Tensor) or not task_embeds.dtype.is_floating_point:
        what = task_embeds.dtype if isinstance(task_embeds, torch.Tensor) else type(task_embeds).__name__
        raise ConditioningError(f"task_embeds must be a float tensor of shape (batch, task_embed_dim), got {what}")
    for name, spec in needed.items():
        if spec.task_embed_dim and (task_embeds.dim() != 2 or task_embeds.shape[1] != spec.task_embed_dim):
            raise ConditioningError(f"task_embeds must have shape (batch, {spec.task_embed_dim}) for "
                                    f"{spec.describe(name)}, got {tuple(task_embeds.shape)}")
    return task_embeds


def validate(state: ConditioningState, task_ids=None, task_embeds=None, adapters=None) -> Conditioning:
    """Check ``task_ids`` / ``task_embeds`` against the conditioned adapters among ``adapters`` (default: active)."""
    needed = state.needed(adapters)
    if not needed:
        names = state.active if adapters is None else adapters
        raise ConditioningError(f"task_ids / task_embeds were given but no adapter among {list(names)} is "
                                f"task-conditioned (set num_tasks or task_embed_dim in its config)")
    takes_ids = {n: s for n, s in needed.items() if s.num_tasks}
    takes_embeds = {n: s for n, s in needed.items() if s.task_embed_dim}
    for value, arg, takers, other in ((task_ids, "task_ids", takes_ids, takes_embeds),
                                      (task_embeds, "task_embeds", takes_embeds, takes_ids)):
        if value is None and takers:
            n, s = next(iter(takers.items()))
            raise ConditioningError(f"{s.describe(n)} needs {arg}, which were not given")
        if value is not None and not takers:
            n, s = next(iter(other.items()))
            both = "both task_ids and task_embeds were given, but" if task_ids is not None and \
                task_embeds is not None else f"{arg} were given, but"
            raise ConditioningError(f"{both} {s.describe(n)} takes only "
                                    f"{'task_ids' if s.num_tasks else 'task_embeds'}")
    if task_ids is not None:
        task_ids = _check_ids(task_ids, takes_ids)
    if task_embeds is not None:
        task_embeds = _check_embeds(task_embeds, takes_embeds)
    if task_ids is not None and task_embeds is not None and task_ids.shape[0] != task_embeds.shape[0]:
        raise ConditioningError(f"task_ids has {task_ids.shape[0]} entries but task_embeds has "
                                f"{task_embeds.shape[0]} rows; both need one per sample")
    return Conditioning(task_ids, task_embeds)


def _same_task(merged: Conditioning, cond: Conditioning) -> bool:
    """Whether every sample of ``cond`` asks for the one task ``merged`` holds."""
    if merged.task_ids is not None and cond.task_ids is not None:
        return bool((cond.task_ids.to(merged.task_ids.device) == merged.task_ids).all())
    if merged.task_embeds is not None and cond.task_embeds is not None:
        want = merged.task_embeds.to(cond.task_embeds.device, cond.task_embeds.dtype)
        return bool((cond.task_embeds == want).all())
    return False


def _describe_task(cond: Conditioning) -> str:
    if cond.task_ids is not None:
        return f"task_id={int(cond.task_ids.reshape(-1)[0])}"
    return "the task_embeds vector given to the merge"


def check_merged(state: ConditioningState, cond: Conditioning, adapters=None) -> None:
    """A merged conditioned adapter computes its one merged task for every sample: conditioning that asks for
    another one is refused (as peft refuses ``adapter_names`` while merged), not silently ignored."""
    for name in state.needed(adapters):
        merged = state.merged.get(name)
        if merged is not None and not _same_task(merged, cond):
            got = cond.task_ids.tolist() if cond.task_ids is not None else "task_embeds"
            raise ConditioningError(f"adapter {name!r} is merged into the weights with {_describe_task(merged)}, "
                                    f"so it cannot condition per sample (got {got}): call unmerge_adapter() first, "
                                    f"or pass only that task")


def check_batch(cond: Conditioning, batch: Optional[int]) -> None:
    """Refuse conditioning whose batch differs from the model input's (``batch`` None: not known)."""
    if batch is not None and batch != cond.batch:
        arg = "task_ids" if cond.task_ids is not None else "task_embeds"
        raise ConditioningError(f"{arg} has {cond.batch} entries but the batch has {batch} samples")


@contextlib.contextmanager
def conditioning(model, task_ids=None, task_embeds=None, *, adapters=None, batch=None):
    """Run ``model`` (a PeftModel, its tuner, or a transformers model with hadapeft adapters) with per-sample
    ``task_ids`` (LongTensor[B]) and/or ``task_embeds`` (FloatTensor[B, task_embed_dim]) for its conditioned adapters.

    Raises :class:`hadapeft.ConditioningError` naming the problem when the tensors do not fit the active adapters.
    """
    state = find_state(model)
    cond = validate(state, task_ids, task_embeds, adapters)
    check_batch(cond, batch)
    if state.merged:
        check_merged(state, cond, adapters)
    if torch.is_grad_enabled():
        state.last = cond  # for gradient-checkpointing recomputation in backward (module docstring)
    previous, state.traced = state.traced, cond
    if torch.compiler.is_compiling():
        try:
            yield cond
        finally:
            state.traced = previous
        return
    token = _CURRENT.set(tuple((s, c) for s, c in _CURRENT.get() if s is not state) + ((state, cond),))
    try:
        yield cond
    finally:
        _CURRENT.reset(token)
        state.traced = previous


@contextlib.contextmanager
def merge_conditioning(tuner, adapter_names, task_id=None, task_embeds=None):
    """Around a merge: conditioned adapters among ``adapter_names`` (default: active) fold the one task ``task_id``
    (or conditioning vector ``task_embeds``, shape (d,) or (1, d)) into the weights; they cannot merge without one."""
    state = getattr(tuner, STATE_ATTR, None)
    adapters = tuner.active_adapters if adapter_names is None else list(adapter_names)
    needed = state.needed(adapters) if state is not None else {}
    if task_id is None and task_embeds is None:
        if needed:
            name, spec = next(iter(needed.items()))
            arg = "task_id=<int>" if spec.num_tasks else "task_embeds=<tensor of width task_embed_dim>"
            raise ConditioningError(f"{spec.describe(name)} is conditioned per sample, so a merge folds in one task: "
                                    f"pass {arg}")
        yield
        return
    if state is None:
        raise ConditioningError("task_id / task_embeds were given but the model holds no conditioned adapter")
    ids = None
    if task_id is not None:
        if isinstance(task_id, torch.Tensor):
            if task_id.numel() != 1 or task_id.dtype.is_floating_point or task_id.dtype == torch.bool:
                raise ConditioningError(f"task_id must be one task, an int (or a one-element integer tensor); got "
                                        f"a {task_id.dtype} tensor of shape {tuple(task_id.shape)}: a merge folds in "
                                        f"a single task")
            ids = task_id.reshape(1)
        elif isinstance(task_id, bool) or not isinstance(task_id, int):
            raise ConditioningError(f"task_id must be an int, got {type(task_id).__name__}")
        else:
            ids = torch.tensor([task_id])
    embeds = None
    if task_embeds is not None:
        embeds = torch.as_tensor(task_embeds)
        if embeds.dim() == 2 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.dim() != 1:
            raise ConditioningError(f"task_embeds for a merge must be one vector, shape (task_embed_dim,) or "
                                    f"(1, task_embed_dim); got shape {tuple(embeds.shape)}")
        embeds = embeds.reshape(1, -1)
    cond = validate(state, ids, embeds, adapters)
    for name in needed:
        merged = state.merged.get(name)
        if merged is not None and not _same_task(merged, cond):
            raise ConditioningError(f"adapter {name!r} is already merged with {_describe_task(merged)}: call "
                                    f"unmerge_adapter() before merging another task")
    with torch.no_grad(), conditioning(tuner, ids, embeds, adapters=adapters):
        yield


# --- conditioning kwargs on model calls -------------------------------------------------------------------------
CONDITIONING_KWARGS = ("task_ids", "task_embeds")
_INPUT_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")


def input_batch(args, kwargs) -> Optional[int]:
    """Batch size of a model call (None when it cannot be told from the arguments)."""
    for value in (*(kwargs.get(k) for k in _INPUT_KEYS), *args[:1]):
        if hasattr(value, "shape") and len(value.shape) > 0:
            return value.shape[0]
    return None


def for_call(model, task_ids, task_embeds, args, kwargs):
    """:func:`conditioning` for one model call ``model(*args, **kwargs)`` (its batch size checked); a no-op when the
    model has no conditioned adapter active (``ConditioningState.ignores_conditioning``)."""
    if find_state(model).ignores_conditioning():
        return contextlib.nullcontext()
    return conditioning(model, task_ids, task_embeds, batch=input_batch(args, kwargs))


@contextlib.contextmanager
def generating():
    """Inside a model's ``generate``: layers may receive each sample's rows repeated (beams, return sequences), and
    per-sample results of the conditioning are computed once for the call (:meth:`Conditioning.once_per_generate`;
    each call, nested ones too, gets a fresh cache, dropped on return)."""
    token = _GENERATING.set({})
    try:
        yield
    finally:
        _GENERATING.reset(token)


class ConditionedForward:
    """Instance ``forward`` of a model with conditioned hadapeft adapters: the model's own forward, whose signature
    also names ``task_ids`` and ``task_embeds`` (applied when given). The HF Trainer keeps only the dataset columns
    that ``get_base_model().forward`` names, so a ``task_ids`` column survives ``remove_unused_columns=True``.

    A plain object holding the model (not a closure), so that ``copy.deepcopy`` points the copy's forward at the copy
    and the model still pickles."""

    _hadapeft_conditioning = True

    def __init__(self, model, inner=None):
        self.model = model
        self.inner = inner  # an instance forward that was there before (e.g. accelerate's hooks), else None
        # The class's forward, looked up now: under torch.compile, ``type(model).forward.__get__(model)`` would
        # resolve to this instance attribute itself and recurse.
        self.cls_forward = type(model).forward
        sig = inspect.signature(inner or model.forward)
        params = [p for p in sig.parameters.values() if p.name not in CONDITIONING_KWARGS]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in CONDITIONING_KWARGS]
        at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
        self.__signature__ = sig.replace(parameters=[*params[:at], *extra, *params[at:]])

    def __call__(self, *args, task_ids=None, task_embeds=None, **kwargs):
        if task_ids is None and task_embeds is None:
            return self._inner(*args, **kwargs)
        with for_call(self.model, task_ids, task_embeds, args, kwargs):
            return self._inner(*args, **kwargs)

    def _inner(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return self.cls_forward(self.model, *args, **kwargs)


class ConditionedGenerate:
    """Instance ``generate`` of a model with conditioned hadapeft adapters: the model's own generate, run inside
    :func:`generating` (so that conditioning given around it, e.g. by ``hadapeft.conditioning``, follows generate's
    beam expansion). PeftModel's generate reaches it through ``base_model.generate``. A plain object, as
    :class:`ConditionedForward`."""

    _hadapeft_conditioning = True

    def __init__(self, model, inner=None):
        self.model = model
        self.inner = inner
        self.__signature__ = inspect.signature(inner or model.generate)

    def __call__(self, *args, **kwargs):
        with generating():
            return (self.inner or type(self.model).generate.__get__(self.model))(*args, **kwargs)


_INSTALLED = {"forward": ConditionedForward, "generate": ConditionedGenerate}


def install_conditioned_forward(model) -> None:
    """Give ``model`` a :class:`ConditionedForward` and, if it generates, a :class:`ConditionedGenerate`
    (idempotent)."""
    for name, cls in _INSTALLED.items():
        if name == "generate" and not callable(getattr(type(model), "generate", None)):
            continue
        current = model.__dict__.get(name)
        if not getattr(current, "_hadapeft_conditioning", False):
            setattr(model, name, cls(model, current))


def uninstall_conditioned_forward(model) -> None:
    for name in _INSTALLED:
        current = model.__dict__.get(name)
        if getattr(current, "_hadapeft_conditioning", False):
            delattr(model, name)
            if current.inner is not None:
                setattr(model, name, current.inner)
