"""Fused 8-bit AdamW: one Triton launch updates every parameter of a bucket.

State (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", as in
bitsandbytes 0.50's AdamW8bit):

- The first moment m is stored as uint8 codes into bitsandbytes' signed dynamic
  map, the second moment v into its unsigned map, each with one fp32 absmax per
  block of 256 values: 2 + 8/256 bytes per parameter instead of fp32 AdamW's 8.
- Tensors under 4096 elements keep fp32 state, as bitsandbytes does: their
  absmax overhead is not worth it and they are often norms and biases, which
  suffer most from quantization. Any tensor may be given fp32 state
  (embeddings, say) by passing fp32 state tensors.

One step, per element, in fp32 registers:

    g  = grad / grad_scale                          (when a GradScaler is used)
    m  = beta1 m + (1 - beta1) g                    m, v dequantized: code * absmax
    v  = beta2 v + (1 - beta2) g^2
    p  = p (1 - lr wd) - lr/(1 - beta1^t) m / (sqrt(v)/sqrt(1 - beta2^t) + eps)

then each block of m and v gets a fresh absmax and every value the nearest code
(ties to the lower code), and p is written in its own dtype: fp32, fp16, or
bf16, rounded to nearest or, optionally, stochastically, so a bf16 parameter
needs no fp32 master copy (small updates survive on average instead of being
rounded away every step).

Grouped launches: parameters are bucketed by (device, parameter dtype, gradient
dtype, state kind, alignment), and each bucket is one launch over a table of
pointers, so a step is a few launches, not one per tensor. Each program
updates 4 blocks (1024 values) of one tensor, 4 values per thread.

Memory traffic per element is what the step needs and no more: the quantization
maps (256 codes and 255 midpoints per moment) are read once per program and
looked up in the program's copy (tl.gather: shared memory), not from global
memory; the nearest-code search and the dequantization did 18 dependent global
gathers per element before. When every address of a bucket is 16-byte aligned
and every size a multiple of 16 (checked on the host; true of anything
PyTorch's allocator hands out whole), the kernel is told so and loads and stores
4 values per thread as one vector; otherwise (a view at an odd offset, an odd
size) the same kernel runs with scalar accesses.

No host sync: the step count lives on the device (fp32, as torch's fused Adam),
the bias corrections are computed in the kernel from it, and with a GradScaler
the kernel reads the scale and the found-inf flag from device memory and a
program that finds inf returns before writing anything; the step counts are
advanced by ``1 - found_inf`` on the device.

Rounding differs from bitsandbytes' in one documented way: its CPU kernel snaps
scaled values to a 65536-point grid before looking up the code, its CUDA kernel
searches with its own pivots; ember takes the nearest code to the fp32 value.
The tests state how closely the two agree.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from .backend import use_triton
from .checks import check_number, check_tensor
from .dynamic_map import dynamic_map
from .launch import TRITON_DTYPE, CompileCase, KernelSpec, compile_case, launch, register

BLOCKSIZE = 256  # values per absmax: bitsandbytes' blockwise optimizers use 256
BLOCKS_PER_PROGRAM = 4  # one program updates 1024 values of one tensor
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 state, as in bitsandbytes

# Columns of the per-launch tensor table (int64): addresses, then the element count.
_COLUMNS = ("param", "grad", "state1", "state2", "absmax1", "absmax2", "step", "numel")


# ----------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCKSIZE)


def init_state(param: torch.Tensor, *, state_bits: int | None = None) -> dict[str, torch.Tensor]:
    """Zero AdamW state for ``param``, with bitsandbytes' key names.

    ``step``: fp32 0-d tensor on the parameter's device. 8-bit: ``state1`` /
    ``state2`` uint8 codes shaped like the parameter, ``absmax1`` / ``absmax2``
    fp32 (ceil(numel/256),). fp32 state: ``state1`` / ``state2`` fp32.
    ``state_bits`` None chooses as bitsandbytes does: 8 from 4096 elements up.
    """
    if state_bits is None:
        state_bits = 8 if param.numel() >= MIN_8BIT_SIZE else 32
    if state_bits not in (8, 32):
        raise ValueError(f"state_bits must be 8 or 32, got {state_bits!r}")
    state = {"step": torch.zeros((), dtype=torch.float32, device=param.device)}
    if state_bits == 32:
        state["state1"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["state2"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state
    blocks = num_blocks(param.numel())
    # A zero code is not zero in the signed map (code 0 is -0.993), but a zero
    # absmax makes every value of a fresh block 0 whatever its codes.
    state["state1"] = torch.zeros_like(param, dtype=torch.uint8, memory_format=torch.contiguous_format)
    state["state2"] = torch.zeros_like(param, dtype=torch.uint8, memory_format=torch.contiguous_format)
    state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
    state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
    return state


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes the optimizer keeps for one parameter (step counter included)."""
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


@functools.lru_cache(maxsize=None)
def _maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed codes, their midpoints, unsigned codes, their midpoints), fp32 on ``device``."""
    signed, unsigned = dynamic_map(True, device), dynamic_map(False, device)
    return signed, (signed[:-1] + signed[1:]) * 0.5, unsigned, (unsigned[:-1] + unsigned[1:]) * 0.5


@functools.lru_cache(maxsize=None)
def _kernel_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_maps`` with each list of 255 midpoints padded to 256 (+inf, never read): one
    power-of-two load of every table per program."""
    signed, signed_mid, unsigned, unsigned_mid = _maps(device)
    pad = torch.full((1,), math.inf, device=device)
    return signed, torch.cat([signed_mid, pad]), unsigned, torch.cat([unsigned_mid, pad])


# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------


@triton.jit
def _one_minus_pow(log_beta, step):
    """1 - beta**step from ln(beta), to fp32 precision even when it is tiny.

    1 - exp(x) cancels for small |x| (beta2 = 0.999 at step 1 leaves 1e-3 of
    it), so there -expm1(x) comes from its Taylor series; the five terms reach
    fp32 precision for |x| < 0.1.
    """
    x = step * log_beta
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0)))))
    return tl.where(x > -0.1, series, 1.0 - tl.exp(x))


@triton.jit
def _nearest_code(x, midpoints):
    """Index of the code nearest x, ties to the lower one: the number of the 255 midpoints below x.

    ``midpoints`` is the program's copy of the (256,) table (padded): tl.gather
    reads it from shared memory, which the compiler fills once per program; the
    search had 8 dependent global gathers per value. (The lookups are written
    out, not through a helper: the interpreter pays for every helper call.)
    """
    index = tl.zeros(x.shape, tl.int32)
    for i in tl.static_range(8):
        half = 128 >> i
        flat = tl.reshape(index + (half - 1), (x.shape[0] * x.shape[1],))
        midpoint = tl.reshape(tl.gather(midpoints, flat, 0), x.shape)
        index = tl.where(midpoint < x, index + half, index)
    return index


@triton.jit
def _dequantize(codes_ptrs, absmax_ptrs, code, mask, block_mask):
    """(BLOCKS, 256) values from their codes, looked up in the program's copy of the map."""
    codes = tl.load(codes_ptrs, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptrs, mask=block_mask, other=0.0)
    values = tl.reshape(tl.gather(code, tl.reshape(codes, (codes.shape[0] * codes.shape[1],)), 0), codes.shape)
    return tl.where(mask, values * absmax[:, None], 0.0)


@triton.jit
def _quantize(values, codes_ptrs, absmax_ptrs, midpoints, mask, block_mask):
    """Store ``values`` (BLOCKS, 256) as codes with a fresh absmax per block (values outside ``mask`` are 0)."""
    absmax = tl.max(tl.abs(values), axis=1)
    # An all-zero block keeps absmax 0; its codes then read back as 0 whatever they are.
    codes = _nearest_code(values / tl.where(absmax > 0, absmax, 1.0)[:, None], midpoints)
    tl.store(codes_ptrs, codes.to(tl.uint8), mask=mask)
    tl.store(absmax_ptrs, absmax, mask=block_mask)


@triton.jit
def _address(row, column, dtype: tl.constexpr, ALIGNMENT: tl.constexpr):
    """The table's pointer in ``column``, with its alignment told to the compiler, which
    cannot know it of an address read from memory: with ALIGNMENT = 16 (every address
    of the bucket a multiple of 16 bytes, checked on the host) each thread's 4 values
    load and store as one vector instead of 4 scalars."""
    pointer = tl.load(row + column).to(tl.pointer_type(dtype))
    if ALIGNMENT > 1:
        # Set on the op that makes the pointer, here: a hint on a helper's argument is lost.
        pointer = tl.multiple_of(pointer, ALIGNMENT)
    return pointer


@triton.jit
def _adamw8bit_kernel(
    table_ptr, program_tensor_ptr, program_chunk_ptr,
    signed_code_ptr, signed_midpoints_ptr, unsigned_code_ptr, unsigned_midpoints_ptr,
    grad_scale_ptr, found_inf_ptr,
    lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, seed,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_8BIT: tl.constexpr,
    HAS_SCALER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr, ALIGNMENT: tl.constexpr,
    BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr, COLUMNS: tl.constexpr,
):
    if HAS_SCALER:
        # An overflowed step writes nothing: parameters and state stay as they were.
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0)
    tensor = tl.load(program_tensor_ptr + pid).to(tl.int64)
    chunk = tl.load(program_chunk_ptr + pid).to(tl.int64)
    row = table_ptr + tensor * COLUMNS
    param_ptr = _address(row, 0, PARAM_DTYPE, ALIGNMENT)
    grad_ptr = _address(row, 1, GRAD_DTYPE, ALIGNMENT)
    step = tl.load(_address(row, 6, tl.float32, ALIGNMENT))
    # The table holds numel // ALIGNMENT: multiplied back, the compiler knows the
    # mask is constant over aligned runs of ALIGNMENT values, which vectorizing
    # a masked load needs.
    numel = tl.load(row + 7) * ALIGNMENT

    blocks = chunk * BLOCKS + tl.arange(0, BLOCKS)
    offs = blocks[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = offs < numel
    block_mask = blocks * BLOCK_SIZE < numel

    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALER:
        grad = grad * (1.0 / tl.load(grad_scale_ptr))
    param_ptrs = param_ptr + offs
    param = tl.load(param_ptrs, mask=mask, other=0.0).to(tl.float32)
    if STATE_8BIT:
        state1_ptrs = _address(row, 2, tl.uint8, ALIGNMENT) + offs
        state2_ptrs = _address(row, 3, tl.uint8, ALIGNMENT) + offs
        absmax1_ptrs = _address(row, 4, tl.float32, ALIGNMENT) + blocks
        absmax2_ptrs = _address(row, 5, tl.float32, ALIGNMENT) + blocks
        # The four maps, 256 fp32 values each, read once per program (1024 values).
        entries = tl.arange(0, 256)
        signed_code = tl.load(signed_code_ptr + entries)
        unsigned_code = tl.load(unsigned_code_ptr + entries)
        exp_avg = _dequantize(state1_ptrs, absmax1_ptrs, signed_code, mask, block_mask)
        exp_avg_sq = _dequantize(state2_ptrs, absmax2_ptrs, unsigned_code, mask, block_mask)
    else:
        state1_ptrs = _address(row, 2, tl.float32, ALIGNMENT) + offs
        state2_ptrs = _address(row, 3, tl.float32, ALIGNMENT) + offs
        exp_avg = tl.load(state1_ptrs, mask=mask, other=0.0)
        exp_avg_sq = tl.load(state2_ptrs, mask=mask, other=0.0)

    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    correction1 = _one_minus_pow(log_beta1, step)
    correction2 = tl.sqrt(_one_minus_pow(log_beta2, step))
    param = param * (1.0 - lr * weight_decay)
    param = param - (lr / correction1) * exp_avg / (tl.sqrt(exp_avg_sq) / correction2 + eps)

    if STOCHASTIC_ROUNDING:
        # bf16 is fp32 with the low 16 bits dropped: add 16 random bits below
        # them, then drop them. Rounds up with probability equal to the dropped
        # fraction, so the expected stored value is the fp32 one.
        noise = tl.randint(seed, offs + tensor * 1099511627776) >> 16
        bits = param.to(tl.uint32, bitcast=True) + noise
        param = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    tl.store(param_ptrs, param.to(PARAM_DTYPE), mask=mask)

    if STATE_8BIT:
        signed_midpoints = tl.load(signed_midpoints_ptr + entries)
        unsigned_midpoints = tl.load(unsigned_midpoints_ptr + entries)
        _quantize(exp_avg, state1_ptrs, absmax1_ptrs, signed_midpoints, mask, block_mask)
        _quantize(exp_avg_sq, state2_ptrs, absmax2_ptrs, unsigned_midpoints, mask, block_mask)
    else:
        tl.store(state1_ptrs, exp_avg, mask=mask)
        tl.store(state2_ptrs, exp_avg_sq, mask=mask)


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Bytes of alignment the kernel may assume of every address in a bucket, and
# of which every element count is a multiple, so that it loads and stores 16
# bytes at a time (4 fp32 values per thread). PyTorch's allocator aligns every
# tensor to 512 bytes and parameter sizes are multiples of 16 in practice; a
# bucket holding a view at an odd offset or an odd-sized tensor launches
# unaligned (ALIGNMENT = 1), correct and slower.
_ALIGNMENT = 16


# Argument types other than compile_case's defaults (pointers to fp32: the code
# tables, the scale and the found-inf flag; i32 scalars).
_ARG_TYPES = dict(table_ptr="*i64", program_tensor_ptr="*i32", program_chunk_ptr="*i32", seed="i64",
                  **dict.fromkeys(("lr", "beta1", "beta2", "log_beta1", "log_beta2", "eps", "weight_decay"), "fp32"))


def _case(param: torch.dtype, grad: torch.dtype, state_8bit: bool, scaler: bool, rounding: bool,
          alignment: int = _ALIGNMENT) -> CompileCase:
    constexprs = dict(PARAM_DTYPE=_TL_DTYPE[param], GRAD_DTYPE=_TL_DTYPE[grad], STATE_8BIT=state_8bit,
                      HAS_SCALER=scaler, STOCHASTIC_ROUNDING=rounding, ALIGNMENT=alignment,
                      BLOCKS=BLOCKS_PER_PROGRAM, BLOCK_SIZE=BLOCKSIZE, COLUMNS=len(_COLUMNS))
    label = ",".join([f"param_{TRITON_DTYPE[param]}", f"grad_{TRITON_DTYPE[grad]}",
                      "state_8bit" if state_8bit else "state_fp32"]
                     + (["scaler"] if scaler else []) + (["stochastic_rounding"] if rounding else [])
                     + ([] if alignment == _ALIGNMENT else ["unaligned"]))
    return compile_case(_adamw8bit_kernel, label, dtype=torch.float32, types=_ARG_TYPES, constexprs=constexprs,
                        tensor_cores=False)


_SPEC = register(KernelSpec(
    name="adamw8bit_step",
    kernel=_adamw8bit_kernel,
    # Elementwise and memory bound. The tile (4 blocks of 256) is fixed
    # because the program table depends on it; 8 warps give each thread 4
    # values per tensor. The compile gate refused larger shares: 2048-value
    # tiles, or 4 warps, spill on sm_90 with stochastic rounding's Philox.
    configs=[triton.Config({}, num_warps=8)],
    key=["PARAM_DTYPE", "GRAD_DTYPE", "STATE_8BIT"],
    compile_cases=[
        _case(torch.float32, torch.float32, True, False, False),   # full fine-tune, fp32 / bf16 autocast
        _case(torch.float32, torch.float16, True, True, False),    # fp16 autocast with loss scaling
        _case(torch.bfloat16, torch.bfloat16, True, False, True),  # bf16-pure, stochastic rounding
        _case(torch.float16, torch.float16, True, True, False),
        _case(torch.float32, torch.float32, False, False, False),  # small tensors: fp32 state
        _case(torch.bfloat16, torch.bfloat16, False, True, True),
        _case(torch.float32, torch.float32, True, False, False, alignment=1),  # a view at an odd offset
    ],
))


@functools.lru_cache(maxsize=64)
def _program_table(numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each program, the tensor it updates and which chunk of 1024 values of it."""
    per_program = BLOCKS_PER_PROGRAM * BLOCKSIZE
    chunks = [-(-n // per_program) for n in numels]
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(chunks))
    chunk = torch.cat([torch.arange(c, dtype=torch.int32) for c in chunks])
    return _to_device(tensor, device), _to_device(chunk, device)


@functools.lru_cache(maxsize=64)
def _tensor_table(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Keyed by the addresses themselves: the table holds nothing else, so a hit is always right.
    return _to_device(torch.tensor(addresses, dtype=torch.int64).view(-1, len(_COLUMNS)), device)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        # From pinned memory the copy is asynchronous: no wait for the queued backward.
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _addresses(p, g, s, dummy) -> list[int]:
    """One row of the tensor table: the addresses the kernel reads and writes, then the element count."""
    absmax1, absmax2 = (s["absmax1"], s["absmax2"]) if "absmax1" in s else (dummy, dummy)
    return [p.data_ptr(), g.data_ptr(), s["state1"].data_ptr(), s["state2"].data_ptr(),
            absmax1.data_ptr(), absmax2.data_ptr(), s["step"].data_ptr(), p.numel()]


def _is_aligned(p, g, s) -> bool:
    """Whether every address and the element count of one parameter are multiples of _ALIGNMENT (host values)."""
    return all(value % _ALIGNMENT == 0 for value in _addresses(p, g, s, s["step"]))


def _launch_bucket(params, grads, states, hyper, grad_scale, found_inf, stochastic_rounding: bool,
                   alignment: int) -> None:
    device = params[0].device
    state_8bit = states[0]["state1"].dtype == torch.uint8
    dummy = states[0]["step"]  # any fp32 address: absent pointers are never read
    addresses = []
    for p, g, s in zip(params, grads, states):
        *pointers, numel = _addresses(p, g, s, dummy)
        addresses += [*pointers, numel // alignment]  # the kernel multiplies it back
    table = _tensor_table(tuple(addresses), device)
    program_tensor, program_chunk = _program_table(tuple(p.numel() for p in params), device)
    signed, signed_mid, unsigned, unsigned_mid = _kernel_maps(device)
    has_scaler = grad_scale is not None
    seed = int(torch.randint(1 << 31, ())) if stochastic_rounding else 0
    launch(
        _SPEC, lambda meta: (program_tensor.numel(),),
        table, program_tensor, program_chunk, signed, signed_mid, unsigned, unsigned_mid,
        grad_scale if has_scaler else dummy, found_inf if has_scaler else dummy,
        hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["log_beta1"], hyper["log_beta2"],
        hyper["eps"], hyper["weight_decay"], seed,
        PARAM_DTYPE=_TL_DTYPE[params[0].dtype], GRAD_DTYPE=_TL_DTYPE[grads[0].dtype], STATE_8BIT=state_8bit,
        HAS_SCALER=has_scaler, STOCHASTIC_ROUNDING=stochastic_rounding, ALIGNMENT=alignment,
        BLOCKS=BLOCKS_PER_PROGRAM, BLOCK_SIZE=BLOCKSIZE, COLUMNS=len(_COLUMNS),
    )


# ----------------------------------------------------------------------------
# PyTorch path (CPU without the interpreter): the same algorithm, tensor by tensor
# ----------------------------------------------------------------------------


def _dequantize_torch(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    numel = codes.numel()
    values = code[codes.view(-1).long()]
    values = torch.nn.functional.pad(values, (0, absmax.numel() * BLOCKSIZE - numel)).view(-1, BLOCKSIZE)
    return (values * absmax[:, None]).view(-1)[:numel]


def _quantize_torch(values: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, midpoints: torch.Tensor) -> None:
    numel = values.numel()
    blocks = torch.nn.functional.pad(values, (0, absmax.numel() * BLOCKSIZE - numel)).view(-1, BLOCKSIZE)
    new_absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / torch.where(new_absmax > 0, new_absmax, 1.0)[:, None]).view(-1)[:numel]
    # side="left" counts the midpoints strictly below: ties go to the lower code.
    codes.view(-1).copy_(torch.searchsorted(midpoints, scaled))
    absmax.copy_(new_absmax)


def _stochastic_round_bf16(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    bits = values.view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    # Adding below the kept bits carries into them with probability = the dropped fraction.
    return ((bits + noise) & ~0xFFFF).view(torch.float32)


# Values per slice of the PyTorch path: its fp32 temporaries stay near 30 MiB
# whatever the tensor's size (blocks are independent, so slicing at block
# boundaries changes nothing).
_TORCH_CHUNK = 1 << 20


def _step_torch(p, g, state, hyper, grad_scale, found_inf, generator) -> None:
    step = state["step"].double()
    beta1, beta2 = hyper["beta1"], hyper["beta2"]
    corrections = ((1 - beta1 ** step).float(), (1 - beta2 ** step).sqrt().float())
    flat = {key: t.view(-1) for key, t in (("param", p), ("grad", g), ("state1", state["state1"]),
                                           ("state2", state["state2"]))}
    for start in range(0, p.numel(), _TORCH_CHUNK):
        end = min(start + _TORCH_CHUNK, p.numel())
        chunk = {key: t[start:end] for key, t in flat.items()}
        if state["state1"].dtype == torch.uint8:
            blocks = slice(start // BLOCKSIZE, num_blocks(end))
            chunk["absmax1"], chunk["absmax2"] = state["absmax1"][blocks], state["absmax2"][blocks]
        _step_torch_chunk(chunk, hyper, corrections, grad_scale, found_inf, generator)


def _step_torch_chunk(chunk, hyper, corrections, grad_scale, found_inf, generator) -> None:
    """One slice, in place: views of the parameter, gradient, state and (8-bit) absmax."""
    grad = chunk["grad"].float()
    if grad_scale is not None:
        grad = grad / grad_scale
    state_8bit = chunk["state1"].dtype == torch.uint8
    if state_8bit:
        signed, signed_mid, unsigned, unsigned_mid = _maps(grad.device)
        exp_avg = _dequantize_torch(chunk["state1"], chunk["absmax1"], signed)
        exp_avg_sq = _dequantize_torch(chunk["state2"], chunk["absmax2"], unsigned)
    else:
        exp_avg, exp_avg_sq = chunk["state1"], chunk["state2"]
    beta1, beta2, lr = hyper["beta1"], hyper["beta2"], hyper["lr"]
    correction1, correction2 = corrections
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    param = chunk["param"].float() * (1 - lr * hyper["weight_decay"])
    param = param - (lr / correction1) * exp_avg / (exp_avg_sq.sqrt() / correction2 + hyper["eps"])
    if generator is not None:
        param = _stochastic_round_bf16(param, generator)

    def keep_unless_inf(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        # Mirrors the kernel's early return without a host sync: a select, not an `if`.
        return new if found_inf is None else torch.where(found_inf != 0, old, new)

    chunk["param"].copy_(keep_unless_inf(param.to(chunk["param"].dtype), chunk["param"]))
    if state_8bit:
        for values, key, midpoints in ((exp_avg, "1", signed_mid), (exp_avg_sq, "2", unsigned_mid)):
            codes, absmax = chunk["state" + key].clone(), chunk["absmax" + key].clone()
            _quantize_torch(values, codes, absmax, midpoints)
            chunk["state" + key].copy_(keep_unless_inf(codes, chunk["state" + key]))
            chunk["absmax" + key].copy_(keep_unless_inf(absmax, chunk["absmax" + key]))
    else:
        chunk["state1"].copy_(keep_unless_inf(exp_avg, chunk["state1"]))
        chunk["state2"].copy_(keep_unless_inf(exp_avg_sq, chunk["state2"]))


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def _check(params, grads, states, lr, betas, eps, weight_decay, grad_scale, found_inf) -> None:
    """Every argument of a step. The kernel reads each parameter, gradient and state tensor flat through
    one address, and writes most of them in place: they must be contiguous (a copy would not be
    updated, and an expanded tensor would be written many times over)."""
    if not (len(params) == len(grads) == len(states)):
        raise ValueError(f"params, grads and states must have the same length, got "
                         f"{len(params)}, {len(grads)}, {len(states)}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        check_number(name, value, at_least=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, at_least=0.0, below=1.0)
    if (grad_scale is None) != (found_inf is None):
        raise ValueError("grad_scale and found_inf must be given together (a GradScaler sets both)")
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        check_tensor(f"params[{i}]", p, contiguous=True)
        check_tensor(f"grads[{i}]", g, shape=tuple(p.shape), device=p.device, contiguous=True)
        _check_state(f"states[{i}]", s, p)
    for name, flag in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if flag is not None:
            # One value, read on the device: a GradScaler's 0-dim tensors (older ones made them (1,)).
            check_tensor(name, flag, (torch.float32,), device=params[0].device if params else None)
            if flag.numel() != 1:
                raise ValueError(f"{name} must hold one value, got shape {tuple(flag.shape)}")


def _check_state(name: str, state, param: torch.Tensor) -> None:
    """A state as ``init_state`` makes it: uint8 moments with fp32 absmax, or fp32 moments; an fp32 step."""
    if not isinstance(state, dict):
        raise TypeError(f"{name} must be a dict from init_state(param), got {type(state).__name__}")
    state_8bit = isinstance(state.get("state1"), torch.Tensor) and state["state1"].dtype == torch.uint8
    expected = {"step", "state1", "state2"} | ({"absmax1", "absmax2"} if state_8bit else set())
    if not expected <= set(state):
        raise ValueError(f"{name}: missing {sorted(expected - set(state))}; make it with init_state(param)")
    check_tensor(f"{name}['step']", state["step"], (torch.float32,), shape=(), device=param.device)
    check_tensor(f"{name}['state1']", state["state1"], (torch.uint8, torch.float32))
    for key in ("state1", "state2"):
        check_tensor(f"{name}['{key}']", state[key], (state["state1"].dtype,), shape=tuple(param.shape),
                     device=param.device, contiguous=True)
    if state_8bit:
        for key in ("absmax1", "absmax2"):
            check_tensor(f"{name}['{key}']", state[key], (torch.float32,), shape=(num_blocks(param.numel()),),
                         device=param.device, contiguous=True)


@torch.no_grad()
def adamw8bit_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    stochastic_rounding: bool = False,
) -> None:
    """One AdamW step on ``params`` in place, with 8-bit (or fp32) state from ``init_state``
    (``ember.kernels.adamw8bit_init_state``), one dict per parameter.

    Parameters, gradients and state tensors must be contiguous: the step reads
    and writes them flat, in place (a non-contiguous or expanded one is refused
    with a ValueError naming it). ``lr``, ``eps`` and ``weight_decay`` are
    finite numbers >= 0, ``betas`` two numbers in [0, 1).

    ``grad_scale`` / ``found_inf``: a GradScaler's scale and overflow flag
    (one-element fp32 device tensors); the gradients are divided by the scale, and when
    the flag is set nothing changes, step counts included, without a host sync.
    ``stochastic_rounding``: bf16 parameters are rounded stochastically instead
    of to nearest (other dtypes are unaffected).
    """
    _check(params, grads, states, lr, betas, eps, weight_decay, grad_scale, found_inf)
    if not params:
        return
    if grad_scale is not None:  # one value however it is shaped: the step counts below are 0-dim
        grad_scale, found_inf = grad_scale.reshape(()), found_inf.reshape(())
    beta1, beta2 = float(betas[0]), float(betas[1])
    hyper = dict(lr=float(lr), beta1=beta1, beta2=beta2, eps=float(eps), weight_decay=float(weight_decay),
                 log_beta1=math.log(beta1) if beta1 > 0 else -math.inf,
                 log_beta2=math.log(beta2) if beta2 > 0 else -math.inf)
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1.0 if found_inf is None else 1.0 - (found_inf != 0).float())

    buckets: dict[tuple, list[int]] = {}
    for i, (p, g, s) in enumerate(zip(params, grads, states)):
        alignment = _ALIGNMENT if _is_aligned(p, g, s) else 1
        buckets.setdefault((p.device, p.dtype, g.dtype, s["state1"].dtype, alignment), []).append(i)
    for (device, dtype, _, _, alignment), indices in buckets.items():
        bucket_params = [params[i] for i in indices]
        bucket_grads = [grads[i] for i in indices]
        bucket_states = [states[i] for i in indices]
        rounding = stochastic_rounding and dtype == torch.bfloat16
        if use_triton(bucket_params[0]):
            _launch_bucket(bucket_params, bucket_grads, bucket_states, hyper, grad_scale, found_inf, rounding,
                           alignment)
            continue
        generator = None
        if rounding:
            generator = torch.Generator(device=device).manual_seed(int(torch.randint(1 << 62, ())))
        for p, g, s in zip(bucket_params, bucket_grads, bucket_states):
            _step_torch(p, g, s, hyper, grad_scale, found_inf, generator)


# ----------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------


def adamw8bit_step_ref(param, grad, state, *, lr, betas, eps, weight_decay, grad_scale=None):
    """The same quantized algorithm in float64, out of place, for tests and benchmarks.

    Returns (param64, exp_avg64, exp_avg_sq64, new_state): the updated
    parameter and moments before quantization, and the state after it
    (codes nearest in float64). The step count is ``state["step"] + 1``.
    """
    beta1, beta2 = betas
    grad = grad.double().reshape(-1)
    if grad_scale is not None:
        grad = grad / float(grad_scale)
    state_8bit = state["state1"].dtype == torch.uint8
    if state_8bit:
        signed, unsigned = dynamic_map(True).double(), dynamic_map(False).double()
        exp_avg = _dequantize_torch(state["state1"].cpu(), state["absmax1"].double().cpu(), signed)
        exp_avg_sq = _dequantize_torch(state["state2"].cpu(), state["absmax2"].double().cpu(), unsigned)
    else:
        exp_avg, exp_avg_sq = state["state1"].double().reshape(-1).cpu(), state["state2"].double().reshape(-1).cpu()
    grad = grad.cpu()
    step = float(state["step"]) + 1
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    param = param.double().reshape(-1).cpu() * (1 - lr * weight_decay)
    param = param - lr / (1 - beta1**step) * exp_avg / (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step) + eps)
    new_state = {"step": torch.tensor(step, dtype=torch.float32)}
    if state_8bit:
        for values, key, code in ((exp_avg, "1", signed), (exp_avg_sq, "2", unsigned)):
            codes = torch.empty(values.shape, dtype=torch.uint8)
            absmax = torch.empty(num_blocks(values.numel()), dtype=torch.float64)
            _quantize_torch(values, codes, absmax, (code[:-1] + code[1:]) * 0.5)
            new_state["state" + key], new_state["absmax" + key] = codes, absmax
    else:
        new_state["state1"], new_state["state2"] = exp_avg, exp_avg_sq
    return param, exp_avg, exp_avg_sq, new_state
