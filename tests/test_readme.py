"""The README's usage snippets run as written (those that need no trainer, hub model or GPU):
`token_logprobs`, `linear_logprobs` on a tiny transformers model, the losses and the fused forms."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _usage_snippets():
    text = README.read_text()
    usage = text[text.index("## Usage") : text.index("### TRL drop-in")]
    return re.findall(r"```python\n(.*?)```", usage, re.S)


def test_usage_snippets_run():
    snippets = _usage_snippets()
    assert len(snippets) >= 4
    namespace: dict = {}
    for code in snippets:  # later snippets reuse names defined by earlier ones, as a reader would
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["loss"].requires_grad
