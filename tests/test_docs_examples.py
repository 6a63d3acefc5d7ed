"""The Python examples of README.md and docs/*.md run as written: each file's ```python blocks in
order, in one namespace, in a scratch directory. Without a GPU the examples' CUDA device is
swapped for the CPU, where ``backend="auto"`` compiles on the reference backend; nothing else in
them is changed, so an example that drifts from the API fails here."""
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, each dedented by its fence's indentation (blocks
    inside list items are indented)."""
    blocks = []
    for indent, body in BLOCK.findall(text):
        lines = body.splitlines()
        assert all(not line.strip() or line.startswith(indent) for line in lines), body
        blocks.append("\n".join(line[len(indent):] for line in lines))
    return blocks


def on_this_machine(code: str) -> str:
    if torch.cuda.is_available():
        return code
    return code.replace('.cuda()', '').replace('device="cuda"', 'device="cpu"')


def test_python_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n- item\n  ```python\n  y = x\n  ```\n```\nshell\n```\n"
    assert python_blocks(text) == ["x = 1", "y = x"]


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_examples_run(doc, tmp_path, monkeypatch):
    with open(os.path.join(ROOT, doc)) as f:
        blocks = python_blocks(f.read())
    if not blocks:
        pytest.skip(f"{doc} has no Python examples")
    monkeypatch.chdir(tmp_path)  # examples may write files (a .dot graph, a saved engine)
    namespace = {"__name__": "__doc_example__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(on_this_machine(code), f"{doc} example {i + 1}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{doc}, example {i + 1} failed: {exc!r}\n{code}") from exc
