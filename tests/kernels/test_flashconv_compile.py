"""The FlashConv Triton kernels compile for real GPUs, without one: ahead-of-time compilation to
sm_80 (A100) and sm_90 (H100/H200) cubins through Triton's bundled ptxas, at the constexprs the
launchers use (bf16 training inputs, head_dim 1 and 8, 64-position chunks, d_state 64; the two
generation step kernels), and the shared memory each kernel needs fits the GPU (at the stages `ssm_scan._launch` would use).

The interpreter tests (test_flashconv.py) check the arithmetic; this checks what the interpreter does
not: tile shapes and dtypes that the GPU compiler accepts, and resource limits. Not checked: the fp32
head_dim-8 backward (90 s to compile; measured by hand at 4 warps: 248 KB at 3 stages, 104 KB at 1, so
`_launch` falls back to 1 stage on an H100)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100, H100)

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashconv import shift_fir, ssm_scan

def compile_(fn, consts, cap, dtypes, stages=None, warps=4):
    sig = {n: "constexpr" if n in consts else dtypes.get(n, "*fp32") if n.endswith("_ptr") else "i32"
           for n in fn.arg_names}
    opts = {"num_warps": warps} if stages is None else {"num_stages": stages, "num_warps": warps}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", cap, 32),
                       options=opts)
    return {"kernel": fn.__name__, "cap": cap, "consts": consts, "stages": stages, "warps": warps,
            "shared": k.metadata.shared,
            "cubin_bytes": len(k.asm["cubin"])}

cap, limit = int(sys.argv[1]), int(sys.argv[2])
rows = []
io = {n: "*bf16" for n in ("u_ptr", "dy_ptr")}
rows.append(compile_(shift_fir._fir_fwd, dict(N=64, REVERSE=False, BLOCK_T=shift_fir.BLOCK_T,
                                             BLOCK_C=shift_fir.BLOCK_C), cap, io))
rows.append(compile_(shift_fir._fir_bwd_params, dict(N=64, BLOCK_T=shift_fir.BLOCK_T, BLOCK_C=shift_fir.BLOCK_C),
                     cap, io))
io = {n: "*bf16" for n in ("q_ptr", "v_ptr")}  # k' comes from the FIR kernel in fp32
for hd in (1, 8):
    consts = dict(HD=hd, BB=ssm_scan._block_batch(hd), T=64, N=32, IEEE=False)
    for backward, fn in ((False, ssm_scan._ssm_fwd), (True, ssm_scan._ssm_bwd)):
        warps = ssm_scan.num_warps(backward, hd)
        row = compile_(fn, consts, cap, io, warps=warps)
        if row["shared"] > limit:  # what _launch does on OutOfResources
            row = compile_(fn, consts, cap, io, stages=1, warps=warps)
        rows.append(row)
from flashconv import step  # generation: one kernel per recurrent step (fp32 state, d_state 64)
rows.append(compile_(step._shift_step, dict(N=64, BLOCK_C=step.BLOCK_C), cap, {"pos_ptr": "*i64"}))
rows.append(compile_(step._ssm_step, dict(n=32, HAS_SKIP=True, BLOCK_R=step.BLOCK_R), cap, {}))
print(json.dumps(rows))
"""


def _ptxas_available() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("cap", [80, 90])
def test_kernels_compile_for_gpus_and_fit_shared_memory(cap):
    if not _ptxas_available():
        pytest.skip("this Triton has no NVIDIA backend (ptxas) to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cap), str(SHARED_LIMIT[cap])], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in rows:
        print(r)
    assert {r["kernel"] for r in rows} == {"_fir_fwd", "_fir_bwd_params", "_ssm_fwd", "_ssm_bwd", "_shift_step",
                                           "_ssm_step"}
    assert len(rows) == 8
    for r in rows:
        assert r["cubin_bytes"] > 0
        assert r["shared"] <= SHARED_LIMIT[cap], r
