"""The compile gate: every registered kernel compiles for sm_80 and sm_90 within limits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ember.kernels.launch import REGISTRY


def _run(args, script=None):
    # The gate's command runs with TRITON_INTERPRET=1, as in CI, and must re-exec
    # without it; a script (Triton needs kernels in a file) runs without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if script is None:
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "ember.kernels.compile_check", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)


@pytest.mark.slow
def test_every_registered_kernel_passes_the_gate():
    result = _run([])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.endswith(" ok")]
    expected = sum(len(s.compile_cases) * len(s.configs) * 2 for s in REGISTRY.values())
    assert len(rows) == expected, result.stdout
    for spec in REGISTRY.values():
        for arch in ("sm_80", "sm_90"):
            assert any(row.startswith(spec.name + " ") and f" {arch} " in row for row in rows), (spec.name, arch)
    # Tensor cores where the gate demands them: HMMA on sm_80, HGMMA on sm_90 for the 16-bit matmuls.
    # HGMMA (wgmma) needs 64 rows per warp group: the attention backward's 32-row tiles take HMMA on sm_90.
    hgmma_kernels = ("linear_cross_entropy_fwd", "attention_fwd_d128", "lora_matmul_dense", "lora_matmul_nf4")
    hgmma_rows = [r.split() for r in rows if r.split()[0] in hgmma_kernels and (" bf16," in r or " fp16," in r)]
    assert hgmma_rows and all(int(r[8]) > 0 for r in hgmma_rows if r[3] == "sm_90")
    lora_rows = [r.split() for r in rows if r.startswith("lora_") and "fp32" not in r.split()[0]]
    matmul_rows = [r.split() for r in rows if r.startswith("attention_")] + hgmma_rows + lora_rows
    assert all(int(r[7]) > 0 for r in matmul_rows if r[3] == "sm_80")
    assert all(int(r[7]) + int(r[8]) > 0 for r in matmul_rows)


def test_gate_fails_on_spills_shared_memory_and_missing_tensor_cores(tmp_path):
    script = tmp_path / "gate_negative.py"
    script.write_text(textwrap.dedent('''
        import triton, triton.language as tl
        from ember.kernels import compile_check
        from ember.kernels.compile_check import check_kernel
        from ember.kernels.launch import CompileCase, KernelSpec

        @triton.jit
        def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)

        @triton.jit
        def dot_kernel(a_ptr, c_ptr, K, BLOCK: tl.constexpr):
            r = tl.arange(0, BLOCK)
            acc = tl.zeros((BLOCK, BLOCK), tl.float32)
            for k in range(0, K, BLOCK):
                a = tl.load(a_ptr + r[:, None] * K + k + r[None, :])
                acc = tl.dot(a, a, acc)
            tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], acc)

        copy_case = CompileCase("fp16", {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32"}, {}, tensor_cores=True)
        copy = KernelSpec("copy", copy_kernel, [triton.Config({"BLOCK": 1024})], [], [copy_case])
        dot_case = CompileCase("fp16", {"a_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32"}, {}, tensor_cores=True)
        # A 128x128 fp32 accumulator in one warp: 512 values per thread cannot stay in registers.
        one_warp = triton.Config({"BLOCK": 128}, num_warps=1, num_stages=2)
        dot = KernelSpec("dot", dot_kernel, [one_warp], [], [dot_case])
        print("COPY", check_kernel(copy, copy_case, copy.configs[0], 80).problems)
        print("SPILL", check_kernel(dot, dot_case, one_warp, 80).problems)
        compile_check.SHARED_LIMIT_BYTES[90] = 1024  # a limit any real tile exceeds
        print("SHARED", check_kernel(dot, dot_case, triton.Config({"BLOCK": 64}, num_warps=4), 90).problems)
    '''))
    result = _run([], script)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ")[0].isupper())
    assert "no tensor-core instructions" in lines["COPY"]
    assert "spills" in lines["SPILL"]
    assert "shared memory" in lines["SHARED"] and "tensor-core" not in lines["SHARED"]
