"""Cold and warm start of a process: import, Engine construction, first and second classify.

    python bench/startup.py [--scales 256,384,512]

Run it twice with the same TRITON_CACHE_DIR: the first process compiles and autotunes every
kernel (cold), the second finds the compiled kernels and the autotune results on disk (warm).
Weights are a random VGG16 (no download); the image is a random 4:3 photo-sized tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", default="256,384,512")
    p.add_argument("--config", default="D")
    args = p.parse_args(argv)
    scales = [int(s) for s in args.scales.split(",")]
    t0 = time.perf_counter()
    import vggfast
    from vggfast.nn import build_model
    t_import = time.perf_counter() - t0
    torch.manual_seed(0)
    model = build_model(args.config)
    t0 = time.perf_counter()
    eng = vggfast.Engine(model.state_dict())
    t_engine = time.perf_counter() - t0
    img = torch.rand(3, 480, 640)

    def once():
        t = time.perf_counter()
        eng.classify(img, scales=scales)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t

    first, second, third = once(), once(), once()
    r = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
         "backend": eng.backend_name, "scales": scales,
         "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"),
         "import_vggfast_s": t_import,
         "engine_s": t_engine, "first_classify_s": first, "second_classify_s": second,
         "third_classify_s": third}
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
