"""Per-layer time of the Triton conv kernel beside cuDNN (conv + bias + ReLU [+ max-pool]).

    python bench/layers.py [--config D] [--batch 64] [--size 224] [--dtype bfloat16]

For each weight layer of the dense net at the given batch and input size: the fused Triton
launch (vggfast.ops.conv2d with ReLU and, where the block ends, the 2x2 pool in the epilogue)
and the same layer in cuDNN eager (bf16 channels_last conv2d, relu, max_pool2d as separate ops),
median ms from triton.testing.do_bench, TFLOP/s, and the config the autotuner picked. Shows where
the whole-network time goes; a GPU is required.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="D")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--width", type=int, default=None, help="input width (default --size)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--rep", type=int, default=200)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/layers.py needs a CUDA GPU")
        return 2
    import triton.testing

    from vggfast import ops
    from vggfast.configs import make_spec
    from vggfast.kernels import conv as kconv

    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    spec = make_spec(args.config)
    dev = torch.device("cuda")
    h, w = args.size, args.width or args.size
    n = args.batch
    print(f"{torch.cuda.get_device_name()}: config {spec.config}, batch {n}, {h}x{w}, {args.dtype}")
    print(f"{'layer':8s} {'in':>16s} {'pool':>4s} {'GFLOP':>7s} {'triton ms':>9s} {'TF/s':>6s} "
          f"{'cudnn ms':>9s} {'TF/s':>6s} {'x':>5s}  config")
    tot_t = tot_c = 0.0
    for l in spec.layers:
        oh, ow = h + 2 * l.pad - l.k + 1, w + 2 * l.pad - l.k + 1
        if oh < 1 or ow < 1:
            break
        gfl = 2 * n * oh * ow * l.cout * l.cin * l.k * l.k / 1e9
        wt = torch.randn(l.cout, l.cin, l.k, l.k, device=dev) * (2 / (l.cin * l.k * l.k)) ** .5
        b = torch.randn(l.cout, device=dev) * 0.1
        packed = ops.pack_conv_weight(wt, b, dtype, dev)
        if l.index == 0:   # conv1_1 reads the fp32 NCHW image
            x = torch.randn(n, l.cin, h, w, device=dev)
            xt = x.permute(0, 2, 3, 1)
        else:
            xt = torch.randn(n, h, w, l.cin, device=dev, dtype=dtype)
            x = xt.permute(0, 3, 1, 2)
        xc = x.to(dtype, memory_format=torch.channels_last)
        wc, bc = wt.to(dtype).to(memory_format=torch.channels_last), b.to(dtype)
        last = l is spec.layers[-1]

        def tri():
            return ops.conv2d(xt, packed, l.pad, relu=l.relu, pool=l.pool,
                              out_dtype=torch.float32 if last else None)

        def cud():
            y = F.conv2d(xc, wc, bc, padding=l.pad)
            if l.relu:
                y = F.relu(y)
            if l.pool:
                y = F.max_pool2d(y, 2, 2)
            return y

        tri(), cud()
        torch.cuda.synchronize()
        t_ms = triton.testing.do_bench(tri, warmup=50, rep=args.rep, return_mode="median")
        c_ms = triton.testing.do_bench(cud, warmup=50, rep=args.rep, return_mode="median")
        tot_t, tot_c = tot_t + t_ms, tot_c + c_ms
        best = getattr(kconv.conv2d_kernel, "best_config", None)
        print(f"{l.name:8s} {str((h, w, l.cin)):>16s} {'y' if l.pool else '':>4s} {gfl:7.2f} "
              f"{t_ms:9.3f} {gfl / t_ms:6.0f} {c_ms:9.3f} {gfl / c_ms:6.0f} "
              f"{c_ms / t_ms:5.2f}  {best}")
        h, w = (oh // 2, ow // 2) if l.pool else (oh, ow)
    print(f"{'total':8s} {'':>16s} {'':>4s} {'':>7s} {tot_t:9.3f} {'':>6s} {tot_c:9.3f} "
          f"{'':>6s} {tot_c / tot_t:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
