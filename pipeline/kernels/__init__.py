"""Hand-written kernels of the TNT model, each behind a switch with a reference path.

inner_attention_triton -- the inner attention (16-token sequences, narrow heads) as
                          fused Triton kernels, forward and backward, for CUDA.
"""
