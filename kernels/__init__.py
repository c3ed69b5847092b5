"""Triton kernels, one module per op; installed as ``gvsl_fast.kernels``.

Each kernel reads half inputs, upcasts right after loading (the interpreter, TRITON_INTERPRET=1,
cannot do bf16 arithmetic) and accumulates in float32; every load and store is masked.
"""
