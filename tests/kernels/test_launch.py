"""The kernel registry's compile cases: signatures read off a kernel's own arguments."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from ember.kernels.launch import compile_case


@triton.jit
def _scaled_rows_kernel(
    x_ptr, out_ptr, lse_ptr,
    n_rows, stride_xm, stride_xn, scale, seed,
    HAS_LSE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_xm + cols * stride_xn, mask=row < n_rows)
    tl.store(out_ptr + row * BLOCK + cols, x * scale + seed)
    if HAS_LSE:
        tl.store(lse_ptr + row, tl.sum(x, 0))


_TYPES = dict(lse_ptr="*fp32", scale="fp32", seed="i64", softcap="fp32")  # softcap: another kernel's


def test_signature_is_the_hand_written_one():
    case = compile_case(_scaled_rows_kernel, "bf16", dtype=torch.bfloat16, types=_TYPES,
                        constexprs=dict(HAS_LSE=True), tensor_cores=False)
    assert list(case.signature.items()) == [
        ("x_ptr", "*bf16"), ("out_ptr", "*bf16"), ("lse_ptr", "*fp32"),
        ("n_rows", "i32"), ("stride_xm", "i32"), ("stride_xn", "i32"), ("scale", "fp32"), ("seed", "i64"),
    ]
    assert case.constexprs == dict(HAS_LSE=True)
    assert (case.name, case.tensor_cores) == ("bf16", False)


def test_an_argument_fixed_as_a_constant_leaves_the_signature():
    # As at a launch, where the JIT specializes an integer argument equal to 1.
    case = compile_case(_scaled_rows_kernel, "unit stride", dtype=torch.float16, types=_TYPES,
                        constexprs=dict(HAS_LSE=False, stride_xn=1), tensor_cores=False)
    assert "stride_xn" not in case.signature and case.constexprs["stride_xn"] == 1
    assert case.signature["x_ptr"] == "*fp16"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(types=_TYPES), r"no element type for _scaled_rows_kernel's x_ptr"),
        (dict(dtype=torch.float32, types=dict(scale="*fp32")), r"scale is typed '\*fp32'"),
        (dict(dtype=torch.float32, types=dict(lse_ptr="fp32")), r"lse_ptr is typed 'fp32'"),
        (dict(dtype=torch.float32, constexprs=dict(HAS_BIAS=True)), r"has no argument\(s\) \['HAS_BIAS'\]"),
    ],
)
def test_an_argument_it_cannot_type_is_refused(arguments, message):
    arguments = {"constexprs": {}, **arguments}
    with pytest.raises(ValueError, match=message):
        compile_case(_scaled_rows_kernel, "case", tensor_cores=False, **arguments)


def test_values_must_name_scalar_arguments():
    with pytest.raises(ValueError, match=r"\['HAS_LSE'\] are constexprs"):
        compile_case(_scaled_rows_kernel, "case", dtype=torch.float32, types=_TYPES, constexprs={},
                     values=dict(HAS_LSE=True), tensor_cores=False)
    with pytest.raises(ValueError, match=r"\['x_ptr'\] are pointers"):
        compile_case(_scaled_rows_kernel, "case", dtype=torch.float32, types=_TYPES, constexprs={},
                     values=dict(x_ptr=16), tensor_cores=False)
    with pytest.raises(ValueError, match=r"has no argument\(s\) \['n_cols'\]"):
        compile_case(_scaled_rows_kernel, "case", dtype=torch.float32, types=_TYPES, constexprs={},
                     values=dict(n_cols=16), tensor_cores=False)


class _FakeDriver:
    """Just enough of a CUDA driver for JITFunction.run to bind and specialize its arguments on a CPU."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


@pytest.mark.parametrize("arch", [80, 90])
def test_the_gate_specializes_as_a_launch_does(monkeypatch, arch):
    # The JIT's own launch path (kernel[grid](...) -> JITFunction.run -> _do_compile) on real CPU
    # tensors, stopped where it would compile; the gate's specialization of the same arguments,
    # given as a compile case, must hand the compiler the same signature, constants, attributes and
    # options. n_rows = 4096 is divisible by 16, stride_xm = 77 is not, stride_xn = 1 becomes the
    # constant 1, seed is 64-bit; the pointers are tensors PyTorch allocated.
    from ember.kernels.compile_check import specialize
    from ember.kernels.launch import launch_arguments
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_scaled_rows_kernel.fn)  # the module's kernel is an interpreter object under CI
    x, out = torch.empty(64, 64, dtype=torch.bfloat16), torch.empty(64, 64, dtype=torch.bfloat16)
    lse = torch.empty(64, dtype=torch.float32)
    assert all(t.data_ptr() % 16 == 0 for t in (x, out, lse))
    seed = 2**33 + 5
    config = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2)

    launched = {}

    def capture(key, signature, device, constexprs, options, attrs, warmup):
        launched.update(signature=signature, constexprs=constexprs, attrs=attrs, options=options)
        # Returning no kernel ends the launch here: no compile, no driver call.

    monkeypatch.setattr(driver, "_active", _FakeDriver(arch))
    monkeypatch.setattr(kernel, "_do_compile", capture)
    kernel[(1,)](x, out, lse, 4096, 77, 1, 0.5, seed, HAS_LSE=True, **config.all_kwargs())
    assert launched

    case = compile_case(_scaled_rows_kernel, "bf16", dtype=torch.bfloat16, types=_TYPES,
                        constexprs=dict(HAS_LSE=True), values=dict(stride_xm=77, stride_xn=1, seed=seed),
                        tensor_cores=False)
    assert launch_arguments(case)["n_rows"] == 4096  # the default rule: an aligned shape
    signature, constexprs, attrs, options = specialize(kernel, case, config, arch)
    assert signature == launched["signature"]
    assert constexprs == launched["constexprs"]
    assert attrs == launched["attrs"]
    assert options == launched["options"]

    # What the launch specialized, spelled out: the gate before issue 16 marked only the pointers.
    index = {name: i for i, name in enumerate(kernel.arg_names)}
    divisible = [["tt.divisibility", 16]]
    assert attrs[(index["n_rows"],)] == divisible and attrs[(index["x_ptr"],)] == divisible
    assert attrs[(index["stride_xm"],)] == [] and attrs[(index["seed"],)] == []
    assert signature["stride_xn"] == "constexpr" and constexprs[(index["stride_xn"],)] == 1
    assert signature["seed"] == "i64" and signature["scale"] == "fp32"
    assert options.num_warps == 4 and options.num_stages == 2 and options.arch == f"sm{arch}"


@triton.jit
def _axpb_kernel(x_ptr, out_ptr, n, a, b, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * a + b, mask=offsets < n)


def test_a_configs_pre_hook_sees_every_argument_by_name_in_the_gate_and_under_the_interpreter():
    # The autotuner calls a config's pre_hook (e.g. to set a TMA descriptor's block shape) with
    # every argument and the config's parameters by name; the gate and the interpreter path too.
    from ember.kernels.compile_check import specialize
    from ember.kernels.launch import KernelSpec, launch
    from triton.runtime.jit import JITFunction

    seen = []
    config = triton.Config({"BLOCK": 16}, num_warps=2, pre_hook=lambda nargs: seen.append(dict(nargs)))
    case = compile_case(_axpb_kernel, "fp32", dtype=torch.float32, types=dict(a="fp32", b="fp32"), constexprs={},
                        tensor_cores=False)
    specialize(JITFunction(_axpb_kernel.fn), case, config, 90)
    assert seen[-1]["n"] == 4096 and seen[-1]["BLOCK"] == 16 and seen[-1]["num_warps"] == 2

    x, out = torch.randn(37), torch.full((37,), float("nan"))
    spec = KernelSpec("axpb", _axpb_kernel, [config], [], [case])
    launch(spec, lambda meta: (triton.cdiv(37, meta["BLOCK"]),), x, out, 37, 2.0, b=0.5)
    assert seen[-1]["x_ptr"] is x and seen[-1]["n"] == 37 and seen[-1]["b"] == 0.5 and seen[-1]["BLOCK"] == 16
    torch.testing.assert_close(out, x * 2.0 + 0.5)


@pytest.mark.parametrize("arch", [80, 90])
def test_hopper_only_configs_are_left_out_before_sm_90_by_the_autotuner_and_the_gate(monkeypatch, arch):
    from ember.kernels import compile_check, launch as launch_module
    from ember.kernels.launch import REGISTRY, KernelSpec

    configs = [triton.Config({"BLOCK": block}) for block in (32, 64, 128)]
    case = compile_case(_axpb_kernel, "fp32", dtype=torch.float32, types=dict(a="fp32", b="fp32"),
                        constexprs={}, tensor_cores=False)
    spec = KernelSpec("axpb_hopper_only", _axpb_kernel, configs, ["n"], [case], hopper_config=2, hopper_only=(2,))
    expected = configs if arch >= 90 else configs[:2]
    assert spec.configs_for(arch) == expected
    assert [spec.runs_on(i, arch) for i in range(3)] == [True, True, arch >= 90]

    # The autotuner on a GPU of that architecture is built over configs_for(arch).
    autotuned = []

    class Tuned:  # tuned[grid](*args): a launch that does nothing
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def fake_autotune(configs, key, reset_to_zero):
        autotuned.append(configs)
        return lambda kernel: Tuned()

    monkeypatch.setattr(launch_module, "interpreting", lambda: False)
    monkeypatch.setattr(launch_module, "_autotuned", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: divmod(arch, 10))
    monkeypatch.setattr(triton, "autotune", fake_autotune)
    launch_module.launch(spec, lambda meta: (1,), None, None, 1, 1.0, 0.0)
    assert autotuned == [expected]

    # The full gate compiles configs_for(arch) on each architecture.
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    monkeypatch.setattr(compile_check, "_check_job", lambda job: job)
    jobs = compile_check.run((arch,), [spec.name], workers=1)
    assert [config for _, _, config, _ in jobs] == [i for i in range(3) if spec.runs_on(i, arch)]


@pytest.mark.parametrize("hopper_only", [(0,), (3,)])
def test_hopper_only_must_name_configs_other_than_the_first(hopper_only):
    from ember.kernels.launch import KernelSpec

    configs = [triton.Config({"BLOCK": block}) for block in (32, 64, 128)]
    with pytest.raises(ValueError, match="hopper_only"):
        KernelSpec("axpb", _axpb_kernel, configs, ["n"], [], hopper_only=hopper_only)
