"""Runtime: the compiled program (arena, steps, CUDA graph) and the ``GIEModule`` wrapper."""
