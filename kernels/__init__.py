"""Triton kernels, installed as ``fastcount.kernels`` (one module per fused op)."""
