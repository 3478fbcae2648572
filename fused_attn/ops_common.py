"""Small helpers every backend and the fake (meta) implementations share."""
from __future__ import annotations

import contextlib
import numbers
import sys

import torch
from torch._subclasses.fake_tensor import is_fake


def grad_recording() -> bool:
    """Whether autograd records the ops run now: grad mode on and not inference mode (which records
    nothing even under ``torch.enable_grad()``, and whose tensors cannot be saved for backward).
    (Dynamo cannot trace ``is_inference_mode_enabled``: a compiled call reads grad mode alone.)"""
    if not torch.is_grad_enabled():
        return False
    return torch.compiler.is_compiling() or not torch.is_inference_mode_enabled()


def vjp(fn, *primals):
    """``torch.func.vjp(fn, *primals)``: fn's outputs and a function of their cotangents (shaped as
    the outputs) giving the primals' gradients, zeros for a primal they do not depend on; by plain
    autograd (``torch.autograd.grad``) outside torch.func's transforms.

    torch.func's grad transforms refuse to run inside any saved-tensor-hooks context
    (``torch.autograd.graph.save_on_cpu()``, ``allow_mutation_on_saved_tensors``, a user's pack
    hooks: "torch.func.{grad, vjp, ...} don't yet support saved tensor hooks"), where plain autograd
    runs, as SDPA's math backward does. torch.func is kept under its own transforms (jacrev(jacrev(f)),
    vmap(grad(f)): their wrapped tensors and levels), under inference mode, while torch.compile
    traces, and inside a registered op's implementation (a traced, subclassed or mode-intercepted
    call), which runs with autograd's dispatch keys excluded: there plain autograd records only with
    them re-admitted for the moment, which is done only inside saved-tensor hooks (the torch.func
    path otherwise, the one those calls always took).

    As torch.func.vjp: the gradients carry a graph (to the primals that require grad, and to the
    cotangents) when grad mode is on at the call of the returned function, and forward-mode
    tangents of the primals flow through both calls. Each primal is differentiated through a
    fresh view of itself, as torch.func takes its primals for independent variables: autograd.grad
    with respect to the tensors themselves would also follow the paths between them (a saved
    output, such as the norm's sum, leads back through the Function's own backward to its weight,
    another primal: the backward called itself without end). A view still leads back to its
    primal, so a graph through the gradient reaches the primal's history; a view, not a detached
    copy, keeps a forward-mode tangent."""
    if (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()
            or torch.is_inference_mode_enabled()):
        return torch.func.vjp(fn, *primals)
    recording = contextlib.nullcontext
    if torch._C._dispatch_tls_is_dispatch_key_excluded(_AUTOGRAD):  # a registered op's implementation
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            return torch.func.vjp(fn, *primals)

        def recording():
            return torch._C._SetExcludeDispatchKeyGuard(_AUTOGRAD, False)

    with recording(), torch.enable_grad():
        leaves = tuple(p.view_as(p) if p.requires_grad else p.view_as(p).requires_grad_() for p in primals)
        outputs = fn(*leaves)
    single = isinstance(outputs, torch.Tensor)

    def vjp_fn(cotangents):
        outs = (outputs,) if single else outputs
        cots = (cotangents,) if single else cotangents
        # (an output that depends on no primal, e.g. the lse of v alone, contributes nothing)
        pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
        if not pairs:
            return tuple(torch.zeros_like(p) for p in leaves)
        with recording():
            return torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], retain_graph=True,
                                       create_graph=torch.is_grad_enabled(), allow_unused=True,
                                       materialize_grads=True)

    return outputs, vjp_fn


_AUTOGRAD = torch._C.DispatchKey.AutogradFunctionality


def known_true(condition) -> bool:
    """``bool(condition)``, except under torch.compile for a condition on a size Dynamo cannot
    guard on, one marked unbacked (``torch._dynamo.decorators.mark_unbacked``, which Dynamo's
    own message on 0/1 specialisation recommends): False there, where ``bool`` failed the trace
    ("Could not guard on data-dependent expression"). For tests that only skip work or take a
    special case that the general path also handles (``numel() == 0``); a bound that must hold
    is asserted instead (``torch._check``). Sizes Dynamo can guard on are guarded on as before."""
    if condition is True or condition is False:  # (eager mode, or sizes Dynamo knows: no call)
        return condition
    if not torch.compiler.is_compiling():
        return bool(condition)
    # Imported here: it costs ~0.5 s (sympy) and a trace has it loaded already. guard_or_false is
    # in torch >= 2.8; before it, unbacked sizes fail as they did.
    from torch.fx.experimental import symbolic_shapes

    guard_or_false = getattr(symbolic_shapes, "guard_or_false", bool)
    return guard_or_false(condition)


def is_int(value) -> bool:
    """Whether a size, length or offset argument is an integer: a Python int (any
    ``numbers.Integral``, numpy's too) but not a bool, or a ``torch.SymInt``, a size traced
    symbolically (``x.shape[0]`` under non-strict ``torch.export``), which is no Integral. (Dynamo,
    under torch.compile and strict export, passes its symbolic sizes off as ints already.)"""
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_device(device, name: str = "device") -> None:
    """A ``device=`` argument (``get_alibi_slopes``, ``KVCache``, the modules' constructors): None,
    a torch.device, a device string or an index. A string torch cannot parse raises ValueError and
    another type TypeError, naming the argument (torch's own errors named neither, "Expected one
    of cpu, cuda, ..." or "argument 'device' must be torch.device"); a well-formed device this
    machine lacks ("cuda" on a CPU-only build, an index without an accelerator) keeps torch's
    error where the tensor is made."""
    if device is None or isinstance(device, torch.device):
        return
    if isinstance(device, str):
        try:
            torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:0' (or a torch.device, an "
                             f"index, None), got {device!r}: {error}") from None
    elif not is_int(device):
        raise TypeError(f"{name} must be None, a torch.device, a device string such as 'cuda:0' or an index, got "
                        f"{type(device).__name__} {device!r}")
    elif device < 0:
        raise ValueError(f"{name} must be a device index >= 0, got {device!r}")


def as_int(value):
    """``int(value)`` for an ``is_int`` value, a ``torch.SymInt`` kept as it is: int() of one
    specialises the trace to the value it was traced at (a guard ``s0 == 9``, which torch.export
    refuses for a dynamic dim). (Dynamo's int() of a symbolic size stays symbolic.)"""
    return value if isinstance(value, torch.SymInt) else int(value)


def exporting() -> bool:
    """Whether torch.export traces this call (strict or not): torch's flag itself, not
    ``torch.compiler.is_exporting()``, which torch 2.11's Dynamo folds to True under every
    torch.compile (torch 2.13 reads the flag there too)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def check_traced(condition, message: str) -> None:
    """``torch._check(condition, lambda: message)`` for a traced condition on sizes, the message
    left out under torch.export: strict export (Dynamo) crashes tracing a callable message of a
    condition it cannot decide ("'function' object has no attribute 'is_quantized'", torch 2.13),
    and torch._check takes no string. The exported program asserts the condition all the same.
    (``torch.compiler.is_exporting()`` here, not ``exporting()``: torch 2.11's Dynamo folds it to
    True under every torch.compile, where that Dynamo cannot trace a closure message either.)"""
    if torch.compiler.is_exporting():
        torch._check(condition)
    else:
        torch._check(condition, lambda: message)


def register_vmap_slice_by_slice(op, qualname: str) -> None:
    """Give the op ``qualname`` (a ``torch.library.custom_op``'s, or one declared in C++: the
    ``fused_attn_C`` ones), which ``op`` calls, a vmap rule that runs it on each sample alone and
    stacks the results along dim 0: what torch's BatchedFallback does for an op without a batching
    rule, bitwise, without the fallback's "There is a performance drop because we have not yet
    implemented the batching rule for <op>. Please file us an issue on GitHub...", which it prints
    from C++ on every call, past Python's warnings filters (inside an autograd Function, a
    UserWarning). Flattening the vmapped dimension into the ops' batch dimension is no option in
    general: dropout masks depend on the batch and row indices, and vmapped weights (ensembles)
    have no batch dimension. Not for ops that mutate an argument (no call under a transform
    mutates: ``rotary.rotate``)."""
    def slice_by_slice(info, in_dims, *args, **kwargs):
        if info.batch_size == 0:  # (as the fallback: no sample to run, so no output shape)
            raise ValueError(f"{qualname} under torch.func.vmap needs a vmapped dimension of size >= 1, got 0")
        results = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)), **kwargs)
                   for i in range(info.batch_size)]
        if isinstance(results[0], torch.Tensor):
            return torch.stack(results), 0
        outs = tuple(torch.stack(out) for out in zip(*results))
        return outs, (0,) * len(outs)

    torch.library.register_vmap(qualname, slice_by_slice)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_FAKE_MODE = torch._C._TorchDispatchModeKey.FAKE


def no_data(t: torch.Tensor) -> bool:
    """Whether ``t`` has no values to read on the host: a meta tensor, or a fake one (a
    ``FakeTensorMode`` active, or a fake tensor used outside it), as memory estimators and shape
    probes run a model outside torch.compile. A call on such tensors takes the path a torch.compile
    trace takes: nothing read on the host (``.tolist()`` raised "Cannot copy out of meta tensor" /
    DataDependentOutputException), sizes from the shapes and the max_seqlen given, or a bound of
    it. Never asked under torch.compile (callers test ``is_compiling()`` first: Dynamo would break
    the graph on the dispatch-mode query). On a plain tensor with no mode active it costs an
    attribute, a type test and the length of the dispatch-mode stack."""
    if t.is_meta:
        return True
    if type(t) not in _PLAIN_TENSORS and is_fake(t):
        return True
    return torch._C._len_torch_dispatch_stack() > 0 and torch._C._get_dispatch_mode(_FAKE_MODE) is not None


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (tensor parallelism). DTensor exists only once
    torch.distributed.tensor is imported, which this does not do; plain tensors return at the
    type check."""
    if type(t) in _PLAIN_TENSORS:
        return False
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def replicated_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` made fit to meet ``like`` in one op: ``t`` itself next to a plain tensor; next to a
    DTensor (tensor parallelism), ``t`` as a DTensor replicated over like's mesh. DTensor's ops
    refuse a plain operand ("got mixed torch.Tensor and DTensor"), so the reference math on
    DTensors wraps the tensors it builds from shapes alone (the visibility mask, ALiBi's key
    distances) and the caller's plain operands next to DTensor ones: every rank holds the same
    whole tensor, which is what ``Replicate`` says, and DTensor's sharding rules then take the part
    each rank's shard needs. A DTensor ``t`` is returned as it is."""
    if type(t) not in _PLAIN_TENSORS or not is_dtensor(like):
        return t
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The placeholder for an absent output (an op cannot return None)."""
    return torch.empty(0, device=like.device, dtype=like.dtype if dtype is None else dtype)


def norm_stat_scale(d: int) -> float:
    """The power of two c with 1/(4d) < c^2 <= 1/d (1 for d <= 1) by which the norms scale a row of
    d elements before summing it or its squares: each (c * s_i)^2 <= sum(s^2) / d, the mean square,
    and so is any partial sum of them (likewise the deviations' against the variance, and
    |c^2 * s_i| against max |s|), so the float32 sums overflow only where the statistic itself
    does. A power of two rounds nothing: the results are the unscaled ones, bit for bit, elsewhere."""
    return 2.0 ** -(((max(d, 1) - 1).bit_length() + 1) // 2)


def new_attention_out(q: torch.Tensor, dv: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention output (B, Hq, Lq, Dv) laid out in memory as a contiguous (B, Lq, Hq, Dv).

    That is the layout a module wants next: ``out.transpose(1, 2).reshape(B, Lq, Hq * Dv)`` is
    then a free view, not a copy (FlashAttention stores its output the same way).
    """
    B, H, L, _ = q.shape
    return torch.empty(B, L, H, dv, device=q.device, dtype=q.dtype if dtype is None else dtype).transpose(1, 2)


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The attention ops' log-sum-exp dtype: float32 (FlashAttention's, whatever the half input
    type), float64 for float64 inputs, so that the returned lse, the sinks applied through it and
    merges of float64 parts stay float64-accurate (``gradcheck``). Only the reference and cpu
    backends take float64."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# The visibility band of the attention ops: query i sees key j iff i + band_lo <= j <= i + band_hi
# (then also the attn_mask). Unbounded ends are +-2^62, so a band needs no shapes to be written
# down; every implementation clamps it to [-Lq, Lk] (clamp_band) before use, where i + band_lo and
# i + band_hi stay within (-Lq, Lq + Lk] and every index sum fits in 32 bits.
BAND_UNBOUNDED = 1 << 62
NO_BAND = (-BAND_UNBOUNDED, BAND_UNBOUNDED)
CAUSAL_BAND = (-BAND_UNBOUNDED, 0)  # top-left causal: j <= i

ALIGNMENTS = ("top_left", "bottom_right")


def attention_band(Lq, Lk, causal: bool = False, window_size=None, alignment: str = "top_left"):
    """(band_lo, band_hi) of ``functional.attention``'s ``causal`` / ``window_size`` / ``alignment``.

    Query i sits at key position ``d = i`` (top_left) or ``d = i + Lk - Lq`` (bottom_right: the last
    query faces the last key, as FlashAttention aligns causal attention and a KV-cache decode wants).
    A window (left, right) keeps keys ``d - left <= j <= d + right``, -1 meaning no limit on that
    side; causal keeps ``j <= d``. Lq and Lk enter only through the bottom-right offset.
    """
    if window_size is None and not causal:  # (the common case: every key, whatever the alignment)
        return NO_BAND
    diag = Lk - Lq if alignment == "bottom_right" else 0
    left, right = window_size if window_size is not None else (-1, -1)
    # a side wider than any length is unbounded (and Python ints past int64 overflowed the ops)
    left, right = (-1 if side >= BAND_UNBOUNDED else side for side in (left, right))
    lo = diag - left if left >= 0 else -BAND_UNBOUNDED
    hi = diag + right if right >= 0 else BAND_UNBOUNDED
    if causal:
        hi = min(hi, diag)
    return lo, hi


def clamp_band(band_lo: int, band_hi: int, Lq: int, Lk: int) -> tuple[int, int]:
    """The band with both ends clamped to [-Lq, Lk]: the same visible keys (i + (-Lq) < 0 <= j
    and i + Lk > Lk - 1 >= j for every query i < Lq and key j < Lk), but small numbers. An empty
    band (band_lo > band_hi) comes out as (Lk, Lk), which hides every key too with lo <= hi (the
    Triton kernels' one-compare band test relies on it)."""
    lo, hi = min(max(int(band_lo), -Lq), Lk), min(max(int(band_hi), -Lq), Lk)
    return (Lk, Lk) if lo > hi else (lo, hi)


# Variable-length (packed) attention: sequence s holds query rows cu_q[s]:cu_q[s+1] and key rows
# cu_k[s]:cu_k[s+1] of the packed (total, heads, dim) tensors and attends within itself only. Its
# band is written relative to top-left alignment; with bottom_right each sequence shifts it by its
# own Lk - Lq (sequence_band). The dropout RNG treats sequence s as an attention call of batch 1 at
# offset ``offset + Hq * cu_q[s]`` (varlen_rng_offset): its rows (h * Lq_s + i) then never meet
# another sequence's, and every backend, looping or native, draws the same mask.

def sequence_band(band_lo: int, band_hi: int, bottom_right: bool, Lq: int, Lk: int) -> tuple[int, int]:
    """The clamped band of one sequence of a varlen call (see above)."""
    diag = Lk - Lq if bottom_right else 0
    return clamp_band(band_lo + diag, band_hi + diag, Lq, Lk)


def varlen_rng_offset(offset: int, heads_q: int, q_start: int) -> int:
    """The dropout offset of the varlen sequence whose queries start at packed row ``q_start``."""
    return offset + heads_q * q_start


def new_varlen_out(q: torch.Tensor, dv: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Varlen attention output: contiguous (total_q, Hq, Dv)."""
    return torch.empty(q.shape[0], q.shape[1], dv, device=q.device, dtype=q.dtype if dtype is None else dtype)


def varlen_lse_shape(q: torch.Tensor) -> tuple[int, int]:
    """Varlen log-sum-exp: (Hq, total_q), as FlashAttention's varlen kernels keep it (``lse_dtype``)."""
    return (q.shape[1], q.shape[0])


def _short(values: list) -> list:
    return values if len(values) <= 12 else values[:6] + ["..."] + values[-6:]


def _used_keys(lengths_k: list, seqused_k, used: list | None = None) -> list:
    """The keys each sequence uses: its length in cu_seqlens_k, or seqused_k[s], which must lie in
    [0, that length] (``used``: seqused_k's values, when the caller read them already)."""
    if seqused_k is None:
        return lengths_k
    used = seqused_k.tolist() if used is None else used
    bad = [s for s, n in enumerate(used) if not 0 <= n <= lengths_k[s]]
    if bad:
        s = bad[0]
        raise ValueError(f"seqused_k[{s}] = {used[s]} is outside [0, {lengths_k[s]}], the keys sequence {s} has "
                         f"in cu_seqlens_k")
    return used


def check_varlen_bounds(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, max_seqlen_q=None,
                        max_seqlen_k=None, seqused_k=None, used_k: list | None = None) -> tuple[int, int]:
    """The data-dependent checks of a varlen call (one device-to-host copy): each cu_seqlens starts
    at 0, never decreases and ends at its total; 0 <= seqused_k[s] <= sequence s's keys; the
    max_seqlens (None: computed) bound the longest sequences. Returns (max_seqlen_q, max_seqlen_k);
    raises ValueError naming the argument. Run by ``functional.attention_varlen`` in eager mode and
    by the varlen op itself for traced calls (torch.compile), where nothing can be read on the host
    at trace time: bad boundaries then fail at run time instead of steering kernels out of bounds.
    ``used_k``: the keys each sequence uses, checked already (a paged cache: ``check_block_table``);
    cu_seqlens_k, total_k and seqused_k are then not read again. cu_seqlens_q / cu_seqlens_k may
    also be host lists already read (a caller that needs the boundaries itself reads them once)."""
    def host(cu_seqlens):
        return cu_seqlens if isinstance(cu_seqlens, list) else cu_seqlens.tolist()
    lengths_q = check_cumulative("cu_seqlens_q", host(cu_seqlens_q), total_q)
    if used_k is None:
        if cu_seqlens_k is cu_seqlens_q and total_k == total_q:
            lengths_k = lengths_q  # (self-attention's one boundaries tensor: read and checked once)
        else:
            lengths_k = check_cumulative("cu_seqlens_k", host(cu_seqlens_k), total_k)
        used_k = _used_keys(lengths_k, seqused_k)
    # The lengths are read anyway, so the kernels get the true longest, not the bound: a model's
    # context length passed with every short batch would otherwise size the Triton grid (and the
    # split-KV plan) for sequences that are not there. No result depends on it (the dropout offsets
    # come from cu_seqlens_q), only the launch.
    return (check_longest("max_seqlen_q", max_seqlen_q, lengths_q, "cu_seqlens_q"),
            check_longest("max_seqlen_k", max_seqlen_k, used_k, "cu_seqlens_k"))


def check_cumulative(name: str, values: list, total: int, total_is: str = "") -> list:
    """Cumulative lengths read on the host (a cu_seqlens, (B + 1) entries): they start at 0, never
    decrease and end at ``total`` (``total_is``: what that total is, for the message); returns the
    B lengths. The one check of every packed call (``check_varlen_bounds``, the modules' packed
    calls, the packed rotary embedding), raising ValueError naming the argument."""
    lengths = [b - a for a, b in zip(values, values[1:])]
    # (a decrease is a negative length: min() in C rather than a generator's any(), every call)
    if values[0] != 0 or values[-1] != total or (lengths and min(lengths) < 0):
        raise ValueError(f"{name} must start at 0, never decrease and end at the total length {total}{total_is}, "
                         f"got {_short(values)}")
    return lengths


def check_longest(max_name: str, max_seqlen, lengths: list, name: str) -> int:
    """The longest of ``lengths`` (those of cumulative lengths ``name``), which ``max_seqlen`` (None:
    not given) must bound; ValueError naming ``max_name`` otherwise."""
    longest = max(lengths, default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{max_name} = {max_seqlen} is shorter than the longest sequence in {name} ({longest})")
    return longest


# A paged KV cache (FlashAttention's / vLLM's ``block_table``): K and V are (num_pages, page_size,
# Hkv, dim) pages shared by all sequences, and sequence s's key j is row j % page_size of page
# block_table[s, j // page_size]. The sequence's key count comes from cu_seqlens_k (its lengths
# only: the cumulative offsets address nothing), or from seqused_k. Every backend sees the cache as
# a packed varlen call in which sequence s owns all pages_per_seq * page_size rows its table row
# can address and uses the first of them (``paged_layout``); the Triton forward reads the pages in
# place, the others (and every call that needs gradients) get them gathered (``gather_kv_pages``).

def paged_layout(block_table: torch.Tensor, page_size: int, cu_seqlens_k: torch.Tensor,
                 seqused_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens_k, seqused_k) of the packed view of a paged cache, on the device, no sync."""
    batch, pages_per_seq = block_table.shape
    rows = pages_per_seq * page_size
    cu = torch.arange(batch + 1, device=cu_seqlens_k.device, dtype=cu_seqlens_k.dtype) * rows
    used = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return cu, (used if seqused_k is None else seqused_k.to(used.dtype))


def gather_kv_pages(k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor):
    """The pages each sequence's table row addresses, back to back: (batch * pages_per_seq *
    page_size, Hkv, dim) K and V for ``paged_layout``'s boundaries. One gather, no host sync; the
    table's unused entries, which may hold anything, are clamped into range (their rows are never
    read). Differentiable: a page shared by several sequences (a common prefix) gets the sum of
    their gradients."""
    batch, pages_per_seq = block_table.shape
    rows = batch * pages_per_seq * k_pages.shape[1]
    if k_pages.shape[0] == 0:  # no pages: every sequence is empty (check_block_table)
        return k_pages.new_zeros(rows, *k_pages.shape[2:]), v_pages.new_zeros(rows, *v_pages.shape[2:])
    pages = block_table.clamp(0, k_pages.shape[0] - 1).long()
    return k_pages[pages].flatten(0, 2), v_pages[pages].flatten(0, 2)


def pages_out_of_range(block_table: torch.Tensor, used_keys: torch.Tensor, page_size: int,
                       num_pages: int) -> torch.Tensor:
    """(B,) bool, on the device: whether a table entry sequence s uses (its first
    ceil(used_keys[s] / page_size), used_keys clamped to the row's room) names a page outside
    [0, num_pages). The entries past those are never read and may hold anything. Checking here
    rather than on the host keeps the table on the device: a decoding step's table of B x
    pages_per_seq entries (64 x 2048, say) took ~3 ms to copy and walk in Python."""
    per_seq, page = block_table.shape[1], max(page_size, 1)
    pages_used = (used_keys.clamp(0, per_seq * page_size) + page - 1) // page
    in_use = torch.arange(per_seq, device=block_table.device) < pages_used[:, None]
    return (in_use & ((block_table < 0) | (block_table >= num_pages))).any(1)


def first_page_out_of_range(block_table: torch.Tensor, s: int, keys: int, page_size: int,
                            num_pages: int) -> tuple[int, int]:
    """(the first out-of-range page sequence s uses, how many entries it uses): the error path of a
    ``pages_out_of_range`` flag, which reads that one table row."""
    pages = block_table[s].tolist()[:-(-keys // page_size)]
    return next(p for p in pages if not 0 <= p < num_pages), len(pages)


def check_block_table(block_table: torch.Tensor, num_pages: int, page_size: int, cu_seqlens_k: torch.Tensor,
                      seqused_k: torch.Tensor | None) -> list:
    """The data-dependent checks of a paged call (one device-to-host copy): cu_seqlens_k starts at 0
    and never decreases, 0 <= seqused_k[s] <= sequence s's keys, every sequence fits its table row,
    and the pages it uses exist. Returns the keys each sequence uses (``check_varlen_bounds``'s
    ``used_k``); raises ValueError naming the argument. The pages are checked on the device
    (``pages_out_of_range``): the boundaries and B flags cross to the host, not the table."""
    per_seq = block_table.shape[1]
    capacity = per_seq * page_size
    cu_dev = cu_seqlens_k.long()
    used_dev = cu_dev[1:] - cu_dev[:-1] if seqused_k is None else seqused_k.long()
    bad_page = pages_out_of_range(block_table, used_dev, page_size, num_pages)
    host = torch.cat([cu_dev, bad_page.long()] + ([used_dev] if seqused_k is not None else [])).tolist()
    n = block_table.shape[0]
    cu, bad_rows = host[:n + 1], host[n + 1:2 * n + 1]
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens_k must start at 0 and never decrease, got {_short(cu)}")
    lengths = _used_keys([b - a for a, b in zip(cu, cu[1:])], seqused_k, host[2 * n + 1:])
    for s, keys in enumerate(lengths):
        if keys > capacity:
            raise ValueError(f"sequence {s} has {keys} keys but its block_table row addresses {per_seq} "
                             f"pages of {page_size} rows ({capacity} keys)")
        if bad_rows[s]:
            page, entries = first_page_out_of_range(block_table, s, keys, page_size, num_pages)
            raise ValueError(f"block_table[{s}] names page {page}, outside the {num_pages} pages of k and v "
                             f"(sequence {s} uses its first {entries} entries)")
    return lengths


def elements_may_overlap(t: torch.Tensor) -> bool:
    """Whether t's elements could share memory (csrc/common/overlap.h's test, which the C++ ``out``
    checks use): ordered by stride, each stepping dim must start past the offsets the smaller ones
    reach. True for expanded (stride 0) and other self-overlapping views; False for every slice,
    transpose or sub-view of a dense tensor (``torch._debug_has_internal_overlap`` gives up on
    those: a packed qkv's ``qkv[:, :, 0]`` could not be turned in place)."""
    return t.numel() != 0 and _layout_may_overlap(t.shape, t.stride())


def _layout_may_overlap(sizes, strides) -> bool:
    """elements_may_overlap's test on sizes and strides (none of them 0 sizes)."""
    reach = 0  # the largest offset the dims so far reach from the first element
    for stride, size in sorted((abs(st), sz) for st, sz in zip(strides, sizes) if sz != 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def tensors_may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors (on one device, not fake) could have an element in common, for any
    layout (torch's own check, ``index_put_``'s, sees only contiguous ones). First their storages'
    byte ranges: disjoint ones (separate allocations, the common case) give False for a few pointer
    reads; compared as ranges, not storage identity, as two storages may wrap one buffer
    (``from_numpy``, DLPack). Then the byte spans from each tensor's first to its last element.
    Spans that interleave are two views of one buffer: when they step alike (equal strides and
    element size, e.g. the ``kv[:, :, 0]`` / ``kv[:, :, 1]`` halves of a packed (B, L, 2, H, D)
    cache) they are distinct if one layout holding both, their sizes plus a dim of 2 spaced by the
    distance between their first elements, has distinct elements (elements_may_overlap's test).
    Anything else is conservatively True."""
    storage_a, storage_b = a.untyped_storage(), b.untyped_storage()
    start_a, start_b = storage_a.data_ptr(), storage_b.data_ptr()
    if start_a + storage_a.nbytes() <= start_b or start_b + storage_b.nbytes() <= start_a:
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    # The rest is a pure function of the two layouts (pointers, shapes, strides, element sizes) and
    # costs ~5 us in Python: the packed cache's halves ask it on every decoding step, so the verdicts
    # are memoised (cleared past 256 layouts, which a model's few caches never reach).
    key = (a.data_ptr(), a.shape, a.stride(), a.element_size(), b.data_ptr(), b.shape, b.stride(), b.element_size())
    verdict = _SHARE_MEMO.get(key)
    if verdict is None:
        if len(_SHARE_MEMO) >= 256:
            _SHARE_MEMO.clear()
        verdict = _SHARE_MEMO[key] = _layouts_may_share_memory(a, b)
    return verdict


_SHARE_MEMO: dict = {}


def _layouts_may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """tensors_may_share_memory's test on the byte spans and layouts of two non-empty tensors."""
    size = a.element_size()
    first_a, first_b = a.data_ptr(), b.data_ptr()
    end_a = first_a + size * (1 + sum((n - 1) * st for n, st in zip(a.shape, a.stride())))
    end_b = first_b + b.element_size() * (1 + sum((n - 1) * st for n, st in zip(b.shape, b.stride())))
    if end_a <= first_b or end_b <= first_a:
        return False
    distance, rest = divmod(abs(first_b - first_a), size)
    if distance == 0 or rest or b.element_size() != size or a.stride() != b.stride():
        return True
    return _layout_may_overlap([max(m, n) for m, n in zip(a.shape, b.shape)] + [2], list(a.stride()) + [distance])
