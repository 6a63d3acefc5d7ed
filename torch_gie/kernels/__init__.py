"""Triton kernels, one family per file: conv2d (implicit GEMM on NHWC views), depthwise conv,
GEMM for Linear, pooling, and elementwise (channel affine, add). Nothing runs at import."""
