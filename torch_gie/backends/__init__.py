"""Backends lower each canonical node of a planned graph to a kernel
``kernel(inputs, outs) -> None`` that stores into the planned output views.

``reference`` uses PyTorch ops (the oracle for the plan, concat slices included); ``triton``
uses torch_gie's Triton kernels. The program (``runtime.program``) is the same for both.
"""
