"""The compile gate: every registered kernel compiles for sm_80 and sm_90 within limits."""

from __future__ import annotations

import json
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


# The tensor-core specs that issue no HGMMA on sm_90 yet (issue 16 is open for them): the gate
# fails them (exit 1); this test tolerates that failure for these specs only, and only that
# failure. Remove a name once its spec passes; the list must not grow.
_NOT_YET_HOPPER: frozenset[str] = frozenset()


@pytest.mark.slow
def test_every_registered_kernel_passes_the_ci_subset_of_the_gate(tmp_path):
    # CI's subset (per spec: its first case, at its first config on sm_80 and its Hopper config
    # on sm_90); the full gate is `python -m ember.kernels.compile_check`.
    from ember.kernels.compile_check import _config_label, _import_kernel_families

    _import_kernel_families()
    result = _run(["--subset", "--json", str(tmp_path / "gate.json")])
    assert result.returncode in (0, 1) and (tmp_path / "gate.json").exists(), result.stderr[-4000:]
    gate = json.loads((tmp_path / "gate.json").read_text())
    rows, cases = gate["rows"], gate["cases"]
    failed_rows = [(r["kernel"], r["case"], r["config"], r["arch"], r["problems"]) for r in rows if not r["ok"]]
    assert not failed_rows, failed_rows
    failed_cases = [c for c in cases if not c["ok"]]
    assert all(c["kernel"] in _NOT_YET_HOPPER for c in failed_cases), failed_cases
    assert result.returncode == (1 if failed_cases else 0), result.stdout[-4000:]

    assert len(rows) == 2 * len(REGISTRY)
    for spec in REGISTRY.values():
        hopper = spec.configs[spec.hopper_config or 0]
        for arch, config in ((80, spec.configs[0]), (90, hopper)):
            row, = [r for r in rows if r["kernel"] == spec.name and r["arch"] == arch]
            assert (row["case"], row["config"]) == (spec.compile_cases[0].name, _config_label(config)), row
    # Tensor cores where the gate demands them: HMMA on sm_80; on sm_90 every tensor-core case
    # has a verdict, and a passing one names a config that issues HGMMA.
    tensor_rows = [r for r in rows if r["tensor_cores"]]
    assert tensor_rows and all(r["hmma"] > 0 for r in tensor_rows if r["arch"] == 80)
    assert all(r["hmma"] + r["hgmma"] > 0 for r in tensor_rows)
    assert {(c["kernel"], c["case"]) for c in cases} == {(r["kernel"], r["case"]) for r in tensor_rows}
    for case in cases:
        hgmma = [r for r in tensor_rows if (r["kernel"], r["case"], r["arch"]) == (case["kernel"], case["case"], 90)
                 and r["hgmma"] > 0]
        assert case["ok"] == bool(hgmma), case
    ready, total = gate["summary"]["hopper_ready_specs"], gate["summary"]["tensor_core_specs"]
    assert total == len({r["kernel"] for r in tensor_rows}) and ready == total - len({c["kernel"] for c in failed_cases})
    assert "sm_90 Hopper-ready tensor-core specs" in result.stdout


def test_gate_fails_on_spills_shared_memory_missing_tensor_cores_and_hmma_only_hopper(tmp_path):
    script = tmp_path / "gate_negative.py"
    script.write_text(textwrap.dedent('''
        import triton, triton.language as tl
        from ember.kernels import compile_check
        from ember.kernels.compile_check import check_kernel, verdicts
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

        @triton.jit
        def attention_like_kernel(q_ptr, v_ptr, o_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  D: tl.constexpr):
            # Two chained dots, as attention's S = Q K^T then O = P V.
            m, n, d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, D)
            q = tl.load(q_ptr + m[:, None] * D + d[None, :])
            kt = tl.load(q_ptr + n[None, :] * D + d[:, None])
            v = tl.load(v_ptr + n[:, None] * D + d[None, :])
            p = tl.exp(tl.dot(q, kt)).to(tl.float16)
            tl.store(o_ptr + m[:, None] * D + d[None, :], tl.dot(p, v))

        copy_case = CompileCase("fp16", {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32"}, {}, tensor_cores=True)
        copy = KernelSpec("copy", copy_kernel, [triton.Config({"BLOCK": 1024})], [], [copy_case])
        dot_case = CompileCase("fp16", {"a_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32"}, {}, tensor_cores=True)
        # A 128x128 fp32 accumulator in one warp: 512 values per thread cannot stay in registers.
        one_warp = triton.Config({"BLOCK": 128}, num_warps=1, num_stages=2)
        dot = KernelSpec("dot", dot_kernel, [one_warp], [], [dot_case])
        print("COPY", check_kernel(copy, copy_case, copy.configs[0], 80).problems)
        print("SPILL", check_kernel(dot, dot_case, one_warp, 80).problems)
        # A 32-row tile cannot take a wgmma (64 rows per warpgroup): HMMA on sm_90, which the row
        # reports and the case fails; the same case with a 64-row config passes.
        small, large = triton.Config({"BLOCK": 32}, num_warps=4), triton.Config({"BLOCK": 64}, num_warps=4)
        small_row = check_kernel(dot, dot_case, small, 90)
        print("HMMA_ROW", small_row.mma, small_row.problems, small_row.notes)
        print("HMMA_CASE", [v.ok for v in verdicts([small_row])], verdicts([small_row])[0].message)
        print("HGMMA_CASE", [v.ok for v in verdicts([small_row, check_kernel(dot, dot_case, large, 90)])])
        # 64 query rows on 8 warps: both warpgroups compute the same rows of S = Q K^T.
        attn_case = CompileCase("fp16", {"q_ptr": "*fp16", "v_ptr": "*fp16", "o_ptr": "*fp32"}, {"D": 128},
                                tensor_cores=True)
        attn = KernelSpec("attn", attention_like_kernel, [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})], [],
                          [attn_case])
        for warps in (8, 4):
            row = check_kernel(attn, attn_case, triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=warps), 90)
            print(f"WORK{warps}", row.work, row.work_total, row.mma, row.problems)
        compile_check.SHARED_LIMIT_BYTES[90] = 1024  # a limit any real tile exceeds
        print("SHARED", check_kernel(dot, dot_case, large, 90).problems)
    '''))
    result = _run([], script)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ")[0].isupper())
    assert "no tensor-core instructions" in lines["COPY"]
    assert "spills" in lines["SPILL"]
    assert lines["HMMA_ROW"].startswith("HMMA 16x8x16 [] ['sm_80-style HMMA']"), lines["HMMA_ROW"]
    assert lines["HMMA_CASE"].startswith("[False] no config of 1 compiled issues HGMMA"), lines["HMMA_CASE"]
    assert lines["HGMMA_CASE"] == "[True]"
    # The max over the two dots is 2.0 (S duplicated), the total 1.5 (S's work twice, PV's once).
    assert lines["WORK8"].startswith("2.0 1.5 HGMMA"), lines["WORK8"]
    assert lines["WORK4"].startswith("1.0 1.0 HGMMA"), lines["WORK4"]
    assert "shared memory" in lines["SHARED"] and "tensor-core" not in lines["SHARED"]


def test_atomics_are_classified_by_their_ptx_memory_order():
    from ember.kernels.compile_check import _atomics

    ptx = textwrap.dedent("""
        \t@%p1 red.global.gpu.relaxed.add.f32 \t[%rd1], %r1;
        \t@!%p2 red.global.gpu.relaxed.add.v4.f32 \t[%rd2], {%r1, %r2, %r3, %r4};
        \tatom.global.acq_rel.gpu.add.f32 %f1, [%rd3], %f2;
        \tatom.global.add.f32 %f3, [%rd4], %f4;
        \tatom.global.sys.release.cas.b32 %r5, [%rd5], 0, 1;
        \tmov.b32 %red1, %r1;
        \tadd.s32 %r9, %red1, 1;
    """)
    assert _atomics(ptx) == ("atom.acq_rel.gpu(1),atom.relaxed.gpu(1),atom.release.sys(1),"
                             "red.relaxed.gpu(2)")
    assert _atomics("\tld.global.b32 %r1, [%rd1];") == "-"
