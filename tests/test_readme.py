"""The README's Python examples run as written, each in a fresh namespace."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import tbptt_fast as tb

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[tuple[int, str]]:
    """(first line, code) of each ```python block, in order."""
    if not README.exists():
        return []
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start(1)), m.group(1))
        for m in re.finditer(r"```python\n(.*?)```", text, re.S)
    ]


BLOCKS = _blocks()


@pytest.mark.skipif(not README.exists(), reason="README.md not beside the tests")
def test_readme_has_the_examples():
    assert len(BLOCKS) >= 6, "the API example and those of 'Using a trained model'"
    text = "\n".join(code for _, code in BLOCKS)
    for name in (
        "predict(",
        "evaluate(",
        "vocab_size=",
        "tb.sample(",
        "on_update=",
        "batch_first=",
        "from tbptt_fast.torch import TBPTT",
    ):
        assert name in text, f"no README example uses {name}"


@pytest.mark.skipif(not README.exists(), reason="README.md not beside the tests")
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(index):
    line, code = BLOCKS[index]
    if "import torch" in code and importlib.util.find_spec("torch") is None:
        pytest.skip("the example uses PyTorch, which is not installed")
    if not tb.native_available():
        if index > 0:
            pytest.skip("the examples use the default backend, cpu (native module not built)")
        code = code.replace('backend="cpu"', 'backend="numpy"')
    threads = tb.get_num_threads() if tb.native_available() else None
    try:  # padded so that a traceback shows the README's line numbers
        exec(compile("\n" * line + code, str(README), "exec"), {})
    finally:
        if threads is not None:
            tb.set_num_threads(threads)
