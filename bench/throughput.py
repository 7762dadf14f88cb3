"""vggfast vs cuDNN eager vs torch.compile, in one run: see vggfast/benchmark.py.

    python bench/throughput.py --help
"""
import sys

from vggfast.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
