"""Fused 8-bit AdamW step: against the float64 reference of the same quantized algorithm, and against bitsandbytes."""

from __future__ import annotations

import math

import pytest
import torch

import ember.kernels.adamw8bit as adamw8bit_module
from ember.kernels.adamw8bit import BLOCKSIZE, adamw8bit_step, adamw8bit_step_ref, init_state, num_blocks
from ember.kernels.backend import forced_backend
from ember.kernels.dynamic_map import dynamic_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One launch per bucket covers tensors of every size: 8-bit state from 4096
# elements (exactly one program; a tail block; several programs), fp32 below.
SHAPES_8BIT = [(4096,), (67, 131), (3, 5, 700), (255, 17), (20, 256)]
SHAPES_FP32_STATE = [(2049,), (1,), (7, 3)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
# A scaled value this close to a midpoint between two codes may round either
# way: fp32 arithmetic is ~1e-7 away from float64's.
MIDPOINT_SLACK = 1e-5


def _params(shapes, dtype, device):
    return [torch.randn(shape, dtype=dtype, device=device) for shape in shapes]


def _grads(params, scale=1.0):
    return [torch.randn_like(p) * scale for p in params]


def _clone_state(state):
    return {key: value.clone() for key, value in state.items()}


def _assert_codes_nearest(name, ours, ref_values, ref_state, key, signed):
    """ours' codes for moment ``key`` are the reference's, or its neighbour where the value sits on a midpoint."""
    code = dynamic_map(signed).double()
    absmax = ref_state["absmax" + key]
    torch.testing.assert_close(ours["absmax" + key].double().cpu(), absmax, rtol=1e-6, atol=0, msg=name)
    ours_codes, ref_codes = ours["state" + key].view(-1).long().cpu(), ref_state["state" + key].view(-1).long()
    differ = ours_codes != ref_codes
    if differ.any():
        assert (ours_codes - ref_codes)[differ].abs().max() == 1, f"{name}: codes more than one apart"
        per_element_absmax = absmax.repeat_interleave(BLOCKSIZE)[: ref_values.numel()]
        scaled = (ref_values / per_element_absmax)[differ]
        midpoint = (code[ours_codes[differ]] + code[ref_codes[differ]]) / 2
        assert (scaled - midpoint).abs().max() <= MIDPOINT_SLACK, f"{name}: a code off its nearest, not at a midpoint"


def _check_step(params_before, grads, states_before, params, states, dtype, assert_within_tolerance, **hyper):
    for i, (p0, g, s0, p, s) in enumerate(zip(params_before, grads, states_before, params, states)):
        ref_param, ref_m, ref_v, ref_state = adamw8bit_step_ref(p0, g, s0, **{**HYPER, **hyper})
        # Stock: the reference rounded to the parameter's dtype, the best any implementation can store.
        assert_within_tolerance(f"param[{i}]", p.view(-1), ref_param, ref_param.to(dtype), dtype)
        assert s["step"].item() == ref_state["step"].item()
        if s["state1"].dtype == torch.uint8:
            _assert_codes_nearest(f"exp_avg[{i}]", s, ref_m, ref_state, "1", signed=True)
            _assert_codes_nearest(f"exp_avg_sq[{i}]", s, ref_v, ref_state, "2", signed=False)
        else:
            assert_within_tolerance(f"exp_avg[{i}]", s["state1"].view(-1), ref_m, ref_m.float(), torch.float32)
            assert_within_tolerance(f"exp_avg_sq[{i}]", s["state2"].view(-1), ref_v, ref_v.float(), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_steps_match_float64(device, dtype, assert_within_tolerance):
    shapes = SHAPES_8BIT + SHAPES_FP32_STATE
    params = _params(shapes, dtype, device)
    # A weight that starts at zero (LoRA's B): the update is all of its value,
    # so the bias corrections must be right to fp32 precision at step 1.
    params.append(torch.zeros(64, 100, dtype=dtype, device=device))
    states = [init_state(p) for p in params]
    # A large tensor forced to fp32 state, as embeddings may be.
    params.append(torch.randn(70, 90, dtype=dtype, device=device))
    states.append(init_state(params[-1], state_bits=32))
    assert [s["state1"].dtype for s in states] == [torch.uint8] * 5 + [torch.float32] * 3 + [torch.uint8, torch.float32]
    for step in range(3):
        # Gradient scales change between steps so that the moments' blocks hold mixed magnitudes.
        grads = _grads(params, scale=10.0 ** -step)
        params_before, states_before = [p.clone() for p in params], [_clone_state(s) for s in states]
        adamw8bit_step(params, grads, states, **HYPER)
        _check_step(params_before, grads, states_before, params, states, dtype, assert_within_tolerance)


def test_block_absmax_and_tail(device):
    """A tail block's absmax covers only its real values; an all-zero block stays absmax 0 and reads as 0."""
    p = torch.randn(BLOCKSIZE * 16 + 5, device=device)
    g = torch.randn_like(p)
    g[BLOCKSIZE : 2 * BLOCKSIZE] = 0  # block 1 never sees a gradient
    g[-5:] = torch.tensor([3.0, -7.0, 1.0, 0.5, 2.0])
    state = init_state(p)
    adamw8bit_step([p], [g], [state], **HYPER)
    assert state["absmax1"].shape == (num_blocks(p.numel()),) == (17,)
    assert state["absmax1"][1].item() == 0 and state["absmax2"][1].item() == 0
    # m = (1 - beta1) g after one step: the tail's absmax is 0.1 * 7.
    assert state["absmax1"][-1].item() == pytest.approx(0.7, rel=1e-6)
    assert state["absmax2"][-1].item() == pytest.approx(1e-3 * 49, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_step_for_step_against_bitsandbytes(device, dtype):
    """From the same state and gradient, one step agrees with bitsandbytes 0.50's CPU AdamW8bit update.

    Stated tolerance: parameters within 2 units in the last place of their
    dtype plus 1e-5 of the learning rate (the update's own rounding); absmax identical to fp32 rounding; codes identical except where
    bitsandbytes' CPU quantizer snaps to its 65536-point grid first: there the
    two dequantized values differ by at most one grid step plus the gap next to
    bitsandbytes' code. Over 5 steps, at least 95% of the codes are identical.
    """
    F = pytest.importorskip("bitsandbytes.functional")
    n = 3 * 4096 + 77
    bnb_param = torch.randn(n, dtype=dtype)
    bnb_state = init_state(bnb_param)
    signed, unsigned = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
    for step in range(1, 6):
        grad = torch.randn(n, dtype=dtype) * 0.3**step
        param = bnb_param.clone().to(device)
        state = {key: value.clone().to(device) for key, value in bnb_state.items()}
        adamw8bit_step([param], [grad.to(device)], [state], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        F.optimizer_update_8bit_blockwise(
            "adam", grad, bnb_param, bnb_state["state1"], bnb_state["state2"], 0.9, 0.999, 0.0, 0.0, 1e-8, step,
            1e-3, signed, unsigned, bnb_state["absmax1"], bnb_state["absmax2"], 0.01, gnorm_scale=1.0,
        )
        bnb_state["step"] += 1
        allowed = 2 * torch.finfo(dtype).eps * bnb_param.float().abs() + 1e-5 * 1e-3
        assert ((param.float().cpu() - bnb_param.float()).abs() <= allowed).all()
        for key, code in (("1", signed), ("2", unsigned)):
            absmax = bnb_state["absmax" + key]
            torch.testing.assert_close(state["absmax" + key].cpu(), absmax, rtol=1e-6, atol=0)
            ours_codes, bnb_codes = state["state" + key].cpu().long(), bnb_state["state" + key].long()
            assert (ours_codes == bnb_codes).float().mean() >= 0.95
            gap_below = code[bnb_codes] - code[(bnb_codes - 1).clamp_min(0)]
            gap_above = code[(bnb_codes + 1).clamp_max(255)] - code[bnb_codes]
            allowed = 2 / 65535 + torch.maximum(gap_below, gap_above) + 1e-7
            assert ((code[ours_codes] - code[bnb_codes]).abs() <= allowed).all()


def test_grad_scale_and_found_inf(device):
    """Scaled gradients with the scale give the unscaled step exactly; found_inf leaves everything as it was."""
    params = _params([(5000,), (300,)], torch.float32, device)
    grads = _grads(params)
    states = [init_state(p) for p in params]
    adamw8bit_step(params, grads, states, **HYPER)  # warm state

    plain_params, plain_states = [p.clone() for p in params], [_clone_state(s) for s in states]
    adamw8bit_step(plain_params, grads, plain_states, **HYPER)

    scale = torch.tensor(1024.0, device=device)
    scaled_grads = [g * 1024 for g in grads]
    for found_inf, expect_params, expect_states in ((1.0, params, states), (0.0, plain_params, plain_states)):
        trial_params, trial_states = [p.clone() for p in params], [_clone_state(s) for s in states]
        adamw8bit_step(trial_params, scaled_grads, trial_states, **HYPER,
                       grad_scale=scale, found_inf=torch.tensor(found_inf, device=device))
        for p, expected in zip(trial_params, expect_params):
            assert torch.equal(p, expected)
        for s, expected in zip(trial_states, expect_states):
            for key in expected:
                assert torch.equal(s[key], expected[key]), key


def test_stochastic_rounding_is_unbiased(device):
    """bf16 weights at 1.0 take an update far below their spacing: rounding to nearest loses it, stochastic keeps it."""
    n = 64 * 1024
    lr = 1e-3  # Adam's first step moves every weight by lr * sign(g)
    nearest = torch.ones(n, dtype=torch.bfloat16, device=device)
    grads = [torch.ones(n, dtype=torch.bfloat16, device=device)]
    adamw8bit_step([nearest], grads, [init_state(nearest)], lr=lr, weight_decay=0.0)
    assert torch.equal(nearest, torch.ones_like(nearest))

    torch.manual_seed(0)
    rounded = torch.ones(n, dtype=torch.bfloat16, device=device)
    adamw8bit_step([rounded], grads, [init_state(rounded)], lr=lr, weight_decay=0.0, stochastic_rounding=True)
    below = 1.0 - 2.0**-8  # the bf16 neighbour below 1.0
    assert set(rounded.float().unique().tolist()) <= {1.0, below}
    # Each weight goes down with probability lr / 2**-8; the mean lands on 1 - lr.
    p_down = lr / 2.0**-8
    tolerance = 4 * math.sqrt(p_down * (1 - p_down) / n) * 2.0**-8
    assert abs(rounded.double().mean().item() - (1.0 - lr)) < tolerance

    # The same torch seed gives the same rounding; two tensors in one step draw different bits.
    torch.manual_seed(0)
    again, twin = torch.ones(n, dtype=torch.bfloat16, device=device), torch.ones(n, dtype=torch.bfloat16, device=device)
    adamw8bit_step([again, twin], grads * 2, [init_state(again), init_state(twin)], lr=lr, weight_decay=0.0,
                   stochastic_rounding=True)
    assert torch.equal(again, rounded)
    assert not torch.equal(twin, rounded)


def test_one_launch_per_bucket(monkeypatch):
    if not adamw8bit_module.use_triton(torch.empty(0)):
        pytest.skip("counts Triton launches: interpreter tier")
    launches = []
    original = adamw8bit_module.launch
    monkeypatch.setattr(adamw8bit_module, "launch", lambda *a, **k: launches.append(k) or original(*a, **k))
    # Six tensors in three buckets: fp32 8-bit state, fp32 fp32-state, bf16 8-bit state.
    params = (_params([(4096,), (5120,), (8000,)], torch.float32, "cpu")
              + _params([(16,), (32,)], torch.float32, "cpu") + _params([(6000,)], torch.bfloat16, "cpu"))
    adamw8bit_step(params, _grads(params), [init_state(p) for p in params], **HYPER)
    assert [k["ALIGNMENT"] for k in launches] == [16, 16, 16]
    # A size that is not a multiple of 16 values, and a view 4 bytes into its
    # buffer, go to a fourth and fifth launch that assumes no alignment.
    launches.clear()
    buffer = torch.randn(8193)
    params += [torch.randn(5000), buffer[1:]]
    adamw8bit_step(params, _grads(params), [init_state(p) for p in params], **HYPER)
    assert sorted(k["ALIGNMENT"] for k in launches) == [1, 16, 16, 16]


def test_unaligned_tensors_match_float64(device, assert_within_tolerance):
    # Views at odd offsets (parameter, gradient and state 4 or 1 bytes off a
    # 16-byte boundary) and odd sizes take the unaligned launch; same results.
    dtype = torch.float32
    params = [torch.randn(8193, device=device)[1:], torch.randn(4099, device=device), torch.randn(4096, device=device)]
    grads = [torch.randn(4097, device=device)[1:].view(64, 64) if i == 2 else torch.randn_like(p)
             for i, p in enumerate(params)]
    grads[2] = grads[2].view(-1)
    states = [init_state(p) for p in params]
    for key in ("state1", "state2"):  # uint8 codes one byte into their buffers
        states[2][key] = torch.zeros(4097, dtype=torch.uint8, device=device)[1:]
    for step in range(2):
        params_before, states_before = [p.clone() for p in params], [_clone_state(s) for s in states]
        adamw8bit_step(params, grads, states, **HYPER)
        _check_step(params_before, grads, states_before, params, states, dtype, assert_within_tolerance)
        grads = [g * 0.1 for g in grads]


def test_state_sizes():
    """2 bytes of codes per parameter plus 2 fp32 absmax per 256; fp32 state below 4096 elements."""
    big, small = torch.empty(4096 * 3, dtype=torch.bfloat16), torch.empty(4095)
    big_state, small_state = init_state(big), init_state(small)
    assert big_state["state1"].dtype == torch.uint8 and small_state["state1"].dtype == torch.float32
    assert adamw8bit_module.state_bytes(big_state) == 2 * big.numel() + 2 * 4 * 48 + 4
    assert adamw8bit_module.state_bytes(small_state) == 8 * small.numel() + 4


def test_bad_input():
    p = torch.randn(10)
    g = torch.randn(10)
    state = init_state(p)
    with pytest.raises(ValueError, match="same length"):
        adamw8bit_step([p], [], [state], lr=1e-3)
    with pytest.raises(ValueError, match="lr must be"):
        adamw8bit_step([p], [g], [state], lr=float("nan"))
    with pytest.raises(ValueError, match="betas"):
        adamw8bit_step([p], [g], [state], lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="grads\\[0\\]"):
        adamw8bit_step([p], [torch.randn(11)], [state], lr=1e-3)
    with pytest.raises(TypeError, match="params\\[0\\]"):
        adamw8bit_step([p.double()], [g.double()], [state], lr=1e-3)
    with pytest.raises(ValueError, match="contiguous"):
        q = torch.randn(4, 5).t()
        adamw8bit_step([q], [torch.randn(5, 4)], [init_state(q)], lr=1e-3)
    with pytest.raises(ValueError, match="together"):
        adamw8bit_step([p], [g], [state], lr=1e-3, grad_scale=torch.tensor(2.0))
    with pytest.raises(ValueError, match="missing"):
        adamw8bit_step([p], [g], [{"step": torch.zeros(()), "state1": torch.zeros(10, dtype=torch.uint8),
                                   "state2": torch.zeros(10, dtype=torch.uint8)}], lr=1e-3)
    with pytest.raises(ValueError, match="state_bits"):
        init_state(p, state_bits=16)


def _strided(t):
    return torch.stack([t, t], dim=-1)[..., 0]


BAD_STEPS = {
    # The step reads and writes every tensor flat and in place: another layout is refused, never misread.
    "expanded-grad": (lambda p, g, s: ([p], [g[:1].expand(4096)], [s]), {}, ValueError,
                      r"grads\[0\] must be contiguous"),
    "strided-grad": (lambda p, g, s: ([p], [_strided(g)], [s]), {}, ValueError, r"grads\[0\] must be contiguous"),
    "strided-state": (lambda p, g, s: ([p], [g], [{**s, "state2": _strided(s["state2"])}]), {}, ValueError,
                      r"states\[0\]\['state2'\] must be contiguous"),
    "strided-absmax": (lambda p, g, s: ([p], [g], [{**s, "absmax1": _strided(s["absmax1"])}]), {}, ValueError,
                       r"states\[0\]\['absmax1'\] must be contiguous"),
    "float64-grad": (lambda p, g, s: ([p], [g.double()], [s]), {}, TypeError, r"grads\[0\] must be float16"),
    "fp16-state": (lambda p, g, s: ([p], [g], [{**s, "state1": s["state1"].half()}]), {}, TypeError,
                   r"states\[0\]\['state1'\] must be uint8 or float32, got torch.float16"),
    "short-absmax": (lambda p, g, s: ([p], [g], [{**s, "absmax2": s["absmax2"][:-1]}]), {}, ValueError,
                     r"states\[0\]\['absmax2'\] must have shape \(16,\)"),
    "step-on-another-dtype": (lambda p, g, s: ([p], [g], [{**s, "step": s["step"].long()}]), {}, TypeError,
                              r"states\[0\]\['step'\] must be float32"),
    "not-a-state": (lambda p, g, s: ([p], [g], [None]), {}, TypeError, r"states\[0\] must be a dict"),
    "lr-inf": (lambda p, g, s: ([p], [g], [s]), dict(lr=float("inf")), ValueError, "lr must be a finite number >= 0"),
    "eps-negative": (lambda p, g, s: ([p], [g], [s]), dict(eps=-1e-8), ValueError, "eps must be a finite number"),
    "weight-decay-nan": (lambda p, g, s: ([p], [g], [s]), dict(weight_decay=float("nan")), ValueError,
                         "weight_decay must be"),
    "beta-nan": (lambda p, g, s: ([p], [g], [s]), dict(betas=(float("nan"), 0.9)), ValueError, r"betas\[0\]"),
    "one-beta": (lambda p, g, s: ([p], [g], [s]), dict(betas=(0.9,)), ValueError, "betas must be two numbers"),
    "grad-scale-of-two": (lambda p, g, s: ([p], [g], [s]), dict(grad_scale=torch.ones(2), found_inf=torch.zeros(1)),
                          ValueError, "grad_scale must hold one value"),
    "found-inf-int": (lambda p, g, s: ([p], [g], [s]),
                      dict(grad_scale=torch.ones(1), found_inf=torch.zeros(1, dtype=torch.int32)), TypeError,
                      "found_inf must be float32"),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_tensors_and_options_are_refused_by_name(case):
    make, options, error, message = BAD_STEPS[case]
    param = torch.randn(4096)
    params, grads, states = make(param, torch.randn(4096), init_state(param))
    before = param.clone()
    with pytest.raises(error, match=message):
        adamw8bit_step(params, grads, states, **{"lr": 1e-3, **options})
    assert torch.equal(param, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_slices_give_the_one_pass_result(monkeypatch, dtype):
    """The PyTorch path works through slices of _TORCH_CHUNK values: any slicing gives the same bits."""
    params = _params([(5000,), (3, 5, 700), (2049,)], dtype, "cpu")
    grads = _grads(params)
    results = []
    for chunk in (1 << 20, 512):  # one slice; many, with a partial last block and fp32 state sliced too
        monkeypatch.setattr(adamw8bit_module, "_TORCH_CHUNK", chunk)
        trial = [p.clone() for p in params]
        states = [init_state(p) for p in trial]
        torch.manual_seed(0)
        with forced_backend("torch"):
            for _ in range(2):
                adamw8bit_step(trial, grads, states, **HYPER, stochastic_rounding=False)
        results.append((trial, states))
    (one_params, one_states), (sliced_params, sliced_states) = results
    for p, q in zip(one_params, sliced_params):
        assert torch.equal(p, q)
    for s, t in zip(one_states, sliced_states):
        for key in s:
            assert torch.equal(s[key], t[key]), key


def test_a_one_element_scale_and_flag_act_as_0_dim_ones(device):
    # Found by the fuzz: a (1,) found_inf (older GradScalers made them so) failed in
    # the step counts' update with "scalar tensor expected to be 0 dim".
    results = []
    for shape in ((), (1,)):
        torch.manual_seed(0)
        params = _params([(4096,), (7,)], torch.float32, device)
        grads, states = _grads(params), [init_state(p) for p in params]
        for found_inf in (0.0, 1.0):
            adamw8bit_step(params, grads, states, **HYPER, grad_scale=torch.full(shape, 2.0, device=device),
                           found_inf=torch.full(shape, found_inf, device=device))
        results.append((params, states))
    (params_0d, states_0d), (params_1, states_1) = results
    for p, q, s, t in zip(params_0d, params_1, states_0d, states_1):
        assert torch.equal(p, q) and all(torch.equal(s[key], t[key]) for key in s)
        assert s["step"].item() == 1.0
