"""Compile the conv kernel for sm_90 (H100) without a GPU, with Triton's bundled ptxas, and report
registers, spills, shared memory and wgmma (HGMMA) vs mma.sync (HMMA) use per autotune config.
A development aid: run `python scripts/aot_sm90.py` after changing kernels/conv.py."""
import re
import triton
from triton.backends.compiler import GPUTarget
from vggfast.kernels import conv
jit = conv.conv2d_kernel.fn.fn
target = GPUTarget("cuda", 90, 32)
backend = triton.compiler.make_backend(target)

def compile_one(dt, cin, cout, ks, pad, relu, pool, cfg, flat_input=False, split_k=1, grouped=False):
    names = jit.arg_names
    ty = {"bf16": "*bf16", "fp32": "*fp32", "fp16": "*fp16"}[dt]
    sig = {}
    for n in names: sig[n] = "i32"
    sig.update({"x_ptr": "*fp32" if flat_input else ty, "w_ptr": ty, "b_ptr": "*fp32", "y_ptr": ty,
                "grp_ptr": "*i64" if grouped else "*fp32", "chunk_ptr": "*i64" if grouped else "*fp32"})
    for n in ("stride_xn", "stride_xh", "stride_xw", "stride_yn", "stride_yh", "stride_yw", "stride_xc"):
        sig[n] = "i64" if n in ("stride_xn", "stride_yn") else "i32"
    consts = dict(CIN=cin, KSIZE=ks, PAD=pad, APPLY_RELU=relu, FUSE_POOL=pool,
                  PRECISION="ieee" if dt == "fp32" else "tf32", SPLIT_K=split_k,
                  GROUPED=grouped, **cfg.kwargs)
    consts["FLAT_K"] = conv.flat_k(cin, cfg.kwargs["BLOCK_K"], 2 if flat_input else 1)
    if not flat_input:
        consts["stride_xc"] = 1
    for k in consts: sig[k] = "constexpr"
    div = ["x_ptr", "w_ptr", "b_ptr", "y_ptr", "grp_ptr", "chunk_ptr", "COUT_P", "stride_yh", "stride_yw", "stride_xh", "stride_xw", "stride_xn", "stride_yn"]
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in div if k in names and sig[k] != "constexpr"}
    src = triton.compiler.ASTSource(fn=jit, constexprs=consts, signature=sig, attrs=attrs)
    opts = backend.parse_options({"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ck = triton.compile(src, target=target, options=opts.__dict__)
    ck.asm["ptx"]; sass = None
    md = ck.metadata
    import subprocess, tempfile, os
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"]); path = f.name
    res = subprocess.run([bindir + "/cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    md = dict(n_regs=int(m.group(1)), stack=int(m.group(2)), shared=md.shared, local=int(m.group(4)))
    sass = subprocess.run([bindir + "/cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    os.unlink(path)
    wgmma = len(re.findall(r"HGMMA", sass)); mma = len(re.findall(r"HMMA", sass))
    cpa = len(re.findall(r"LDGSTS", sass)); ldl = len(re.findall(r"LDL|STL", sass)); md["ldl"] = ldl
    return md, wgmma, mma, cpa, ck

if __name__ == "__main__":
    import sys
    only = sys.argv[1:]   # optional case names, e.g. "fc6-split8"
    cases = {"conv1_1": ("bf16", 3, 64, 3, 1, True, False, True, 1),
             "conv1_2": ("bf16", 64, 64, 3, 1, True, True, False, 1),
             "conv3_x": ("bf16", 256, 256, 3, 1, True, False, False, 1),
             "conv4_3": ("bf16", 512, 512, 3, 1, True, True, False, 1),
             "conv5_1-split16": ("bf16", 512, 512, 3, 1, True, False, False, 16),
             "fc6": ("bf16", 512, 4096, 7, 0, True, False, False, 1),
             "fc6-split8": ("bf16", 512, 4096, 7, 0, True, False, False, 8),
             "fc8": ("bf16", 4096, 1000, 1, 0, False, False, False, 1)}
    # Grouped launches (one launch, several input sizes): the same cases with GROUPED=True.
    cases.update({f"{k}-grouped": v + (True,) for k, v in list(cases.items())})
    for name, (dt, cin, cout, ks, pad, relu, pool, flat, split, *grp) in cases.items():
        if only and name not in only:
            continue
        cfgs = conv.FLAT_CONFIGS if flat else [c for cs in conv.CONFIGS_BY_CLASS.values() for c in cs]
        for cfg in dict.fromkeys(cfgs):
            try:
                md, wg, mma, cpa, ck = compile_one(dt, cin, cout, ks, pad, relu, pool, cfg, flat, split, bool(grp))
                print(f"{name}: {dt} cin{cin} cout{cout} k{ks} pool{int(pool)} split{split} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}: "
                      f"regs={md['n_regs']} stack={md['stack']} ldl/stl={md['ldl']} smem={md['shared']} HGMMA={wg} HMMA={mma} LDGSTS={cpa}")
            except Exception as e:
                print("FAIL", dt, cin, cout, ks, pool, cfg, repr(e)[:2000])
