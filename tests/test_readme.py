"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tbptt_fast as tb

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not README.exists(), reason="README.md not beside the tests")
def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "no python example in README.md"
    code = blocks[0]
    if not tb.native_available():
        code = code.replace('backend="cpu"', 'backend="numpy"')
    threads = tb.get_num_threads() if tb.native_available() else None
    try:
        exec(compile(code, str(README), "exec"), {})
    finally:
        if threads is not None:
            tb.set_num_threads(threads)
