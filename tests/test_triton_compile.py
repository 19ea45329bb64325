"""The kernels compile for an H100 (sm_90) without a GPU.

The interpreter checks numerics but never runs Triton's GPU compiler, so a
kernel could pass CI and fail to compile on the GPU. Here every kernel is
compiled ahead of time for sm_90 (triton's bundled ptxas) at the full
model's channel counts, fp32 (TF32 dot) and bf16, with the specialisations a
real launch gets (16-byte aligned pointers, channel stride 1), and must use
tensor-core MMA. Runs in a subprocess because conftest turns the interpreter on.
"""
import os
import subprocess
import sys
from pathlib import Path

# (kernel module, kernel name, pointer args in the compute dtype, constexprs, launch options)
CASES = [
    ("conv_bn_lrelu", "_conv_bn_lrelu_kernel", ("x_ptr", "w_ptr", "y_ptr"),
     dict(KH=3, KW=3, CIN_P=16, COUT_P=64, PADDED=True, EVEN_K=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=16), dict(num_warps=8, num_stages=3)),
    ("conv_bn_lrelu", "_conv_bn_lrelu_kernel", ("x_ptr", "w_ptr", "y_ptr"),
     dict(KH=18, KW=18, CIN_P=128, COUT_P=32, PADDED=False, EVEN_K=True, BLOCK_M=128, BLOCK_N=32, BLOCK_K=64), dict(num_warps=4, num_stages=3)),
    ("inception", "_inception_kernel", ("x_ptr", "w1_ptr", "w3_ptr", "y_ptr"),
     dict(CIN_P=16, A_P=128, B_P=64, BLOCK_M=64, BLOCK_K=16), dict(num_warps=4, num_stages=2)),
    ("head", "_head_kernel", ("x_ptr", "w1_ptr", "w2_ptr"),
     dict(C0_P=32, C1_P=64, C2_P=64, EMIT_SUMS=True, BLOCK_M=128), dict(num_warps=4, num_stages=1)),
]
# Integer args a real launch sees as multiples of 16 (channel counts, NHWC strides).
DIV16 = {"C_in", "C0", "sxn", "sxh", "sxw", "syn", "syh", "syw"}
UNIT = {"sxc", "syc"}  # NHWC channel stride: Triton specialises 1 to a constant


def _compile_all():
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    for mod_name, kname, ptrs, consts, opts in CASES:
        kernel = getattr(importlib.import_module(f"fastcount.kernels.{mod_name}"), kname)
        for dt, prec in (("fp32", "tf32"), ("bf16", "ieee")):
            names = kernel.arg_names
            sig, constexprs, attrs = {}, {}, {}
            values = {**consts, "PREC": prec, **{u: 1 for u in UNIT}}
            for i, n in enumerate(names):
                if n in values:
                    sig[n] = "constexpr"
                    constexprs[(i,)] = values[n]
                elif n.endswith("_ptr"):
                    sig[n] = "*" + (dt if n in ptrs else "fp32")
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif n.startswith("slope"):
                    sig[n] = "fp32"
                else:
                    sig[n] = "i32"
                    if n in DIV16:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target, options=opts)
            ptx = compiled.asm["ptx"]
            assert "mma" in ptx, f"{kname} {dt}: no tensor-core MMA in the PTX"
            print(f"{kname} {dt}/{prec} {consts}: ok, shared {compiled.metadata.shared} B")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a 3.9 warning; the 3.6 default
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count(": ok") == 2 * len(CASES)


if __name__ == "__main__":
    _compile_all()
