"""The README's two-line example runs as written."""

from __future__ import annotations

import re

from tests.helpers import REPO


def test_readme_two_lines_example_runs(capsys):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## The two lines"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "recon_aux.attach(encoder, optimizer)" in code and "aux.loss(images)" in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "layer4.1.conv2 " in out and "'lpips'" in out
