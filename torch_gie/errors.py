"""Exceptions torch_gie raises on purpose, so users can tell a model we cannot compile
(``CompileError``) from a bug in torch_gie (anything else)."""


class CompileError(RuntimeError):
    """The model cannot be compiled; the message names the cause and, where possible, a fix."""
