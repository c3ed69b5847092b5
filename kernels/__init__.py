"""Triton kernels, one module per op; installed as ``gvsl_fast.kernels``.

Each kernel reads half inputs and upcasts right after loading (the interpreter, TRITON_INTERPRET=1,
cannot do bf16 arithmetic); the samplers accumulate in float32, lncc's window sums in float64.
Every load and store of a volume is masked.
"""
