"""@triton.jit kernels, one op per file (installed as vggfast.kernels)."""
