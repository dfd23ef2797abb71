"""Mixed precision for the score model with the sampler's state kept in float32.

`with_precision(model, "bf16")` runs the epsilon model under torch.autocast: its convolutions and matmuls in
bfloat16 (or float16), its norms in float32 (autocast's policy; the fused GroupNorm keeps float32 statistics
whatever its input), and the epsilon it returns cast back to the state's dtype, so the solver's arithmetic
(and the adjoint's) stays in float32. The wrapper is cached per model, so CUDA graphs captured for it are
reused across calls.

Autocast casts every weight it hands to a lower-precision op at every call, and clears what it cached when
its region ends: for DDPM++ that is 374 cast kernels per forward (every convolution's and dense layer's weight
and bias), at each step of every purification; on an H200 the casts for the convolutions took 0.64 ms of a
10.4 ms bf16 forward at batch 64 (bench/RESULTS.md; how much of that was the weights' is not measured). The
wrapper keeps those casts instead (`_WeightCasts`): its first call runs under a recorder that notes which
parameters autocast casts to the lower precision (and which it also reads uncast: those are left alone), and
later calls hand the model the kept copies through torch.func.functional_call, so autocast finds them already
in its precision and casts nothing. The values are the ones autocast would compute (the same rounding of the
same weights), so the result is bit for bit the same. The copies follow the weights: a parameter that moved
(`model.cuda()`, `p.data = ...`) or was changed in place by a tracked operation (load_state_dict, an optimizer
step, `with torch.no_grad(): p.copy_(...)`) is cast again; edits through `p.data`, which autograd does not
track either, are not seen. Where a weight that would be cast requires grad while grad mode is on, the
wrapper runs plain autocast, whose casts are differentiable, so gradients to the weights stay exact. The
copies take half the memory of the float32 weights they copy.
"""
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The wrappers are kept on the model itself, in a plain dict attribute (not a submodule, so the module tree and
# state dict are unchanged): a WeakKeyDictionary from model to wrapper would keep every model alive, and with
# it its CUDA graphs, since each wrapper holds its model.
_ATTRIBUTE = "_rdp_core_precision_wrappers"


def _storage_key(tensor):
    try:
        return tensor.device, tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, some subclasses)
        return None


def tensor_version(tensor):
    """How many tracked in-place changes `tensor` has had; -1 for an inference tensor, which counts none
    (a model built under torch.inference_mode() cannot be edited outside it)."""
    return -1 if tensor.is_inference() else tensor._version


# How autocast's casts reach the dispatcher: _to_copy, or to.dtype under torch.inference_mode().
_CASTS = (torch.ops.aten._to_copy, torch.ops.aten.to)


class _CastRecorder(TorchDispatchMode):
    """Notes, by storage, which parameters an autocast forward casts to `dtype` and which it reads as they are
    (any op but a view of them or that cast)."""

    def __init__(self, parameters, dtype):
        super().__init__()
        self.by_storage = {_storage_key(p): name for name, p in parameters.items()}
        self.by_storage.pop(None, None)
        self.dtype, self.cast, self.read_uncast = dtype, set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = {_storage_key(o) for o in tree_leaves(out) if isinstance(o, torch.Tensor)}
        cast = func.overloadpacket in _CASTS and isinstance(out, torch.Tensor) and out.dtype == self.dtype
        for tensor in tree_leaves((args, kwargs)):
            key = _storage_key(tensor) if isinstance(tensor, torch.Tensor) else None
            name = self.by_storage.get(key) if key is not None else None
            if name is None:
                continue
            if cast:
                self.cast.add(name)
            elif key not in outputs:  # views of a parameter (t, unsqueeze, expand...) share its storage
                self.read_uncast.add(name)
        return out


class _WeightCasts:
    """The low-precision copies of the parameters autocast casts, with the address and version of each source."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.names, self.sources, self.copies = None, None, {}  # names: None until recorded

    def _stamp(self, parameters):
        return tuple((parameters[n].data_ptr(), parameters[n].device, tensor_version(parameters[n]))
                     for n in self.names)

    def record(self, run, parameters):
        """run() under a recorder (the model's first call): it decides which parameters are kept cast."""
        recorder = _CastRecorder(parameters, self.dtype)
        with recorder:
            out = run()
        # Parameters that share a storage (views of one flat buffer) cannot be told apart by it: keep none.
        distinct = len(recorder.by_storage) == len(parameters)
        self.names = sorted(recorder.cast - recorder.read_uncast) if distinct else []
        return out

    def current(self, parameters, may_cast=True):
        """The kept copies, cast again where a source moved or changed; None when there is nothing to keep, or
        when they would have to be cast and may not."""
        if not self.names:
            return None
        stamp = self._stamp(parameters)
        if stamp != self.sources:
            if not may_cast:
                return None
            with torch.no_grad():
                self.copies = {n: parameters[n].detach().to(self.dtype) for n in self.names}
            self.sources = stamp
        return self.copies


class AutocastEps(nn.Module):
    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype
        # Per device type: autocast's lists of what it casts differ between the CPU and CUDA.
        self._casts = {}

    def forward(self, x, t):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self._run(x, t).to(x.dtype)

    def _run(self, x, t):
        if not isinstance(self.model, nn.Module):
            return self.model(x, t)
        if x.device.type not in self._casts:
            self._casts[x.device.type] = _WeightCasts(self.dtype)
        casts = self._casts[x.device.type]
        parameters = dict(self.model.named_parameters())
        if casts.names is None:
            return casts.record(lambda: self.model(x, t), parameters)
        if torch.is_grad_enabled() and any(parameters[n].requires_grad for n in casts.names):
            return self.model(x, t)  # autocast's own casts carry the weights' gradients
        # A cast made during a CUDA-graph capture would live in the graph's private pool; the capture's warm-up
        # runs make them before it.
        copies = casts.current(parameters, may_cast=not _capturing(x))
        if copies is None:
            return self.model(x, t)
        return torch.func.functional_call(self.model, copies, (x, t), strict=False, tie_weights=False)


def _capturing(x):
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def with_precision(model, precision):
    """`model` itself for "fp32" (or None), else its (cached) autocast wrapper."""
    if precision is None or precision == "fp32":
        return model
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    try:
        per_model = vars(model).setdefault(_ATTRIBUTE, {})
    except TypeError:  # a callable without attributes: a new wrapper each call (and so new graphs)
        return AutocastEps(model, PRECISIONS[precision])
    if precision not in per_model:
        per_model[precision] = AutocastEps(model, PRECISIONS[precision])
    return per_model[precision]
