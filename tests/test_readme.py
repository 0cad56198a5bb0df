"""The README as a contract: its usage snippets run as written (those that need no trainer, hub model
or GPU: `token_logprobs`, `linear_logprobs` on a tiny transformers model, the losses and the fused
forms), its test command is the one `.ci/run` runs, and it stays a short front page (~200 lines;
the full tables live in docs/BENCHMARKS.md)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 210


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


def _bash_blocks(text):
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]


def test_readme_test_command_is_what_ci_runs():
    commands = [c for c in _bash_blocks(README.read_text()) if "pytest" in c and c.startswith("pip install")]
    assert len(commands) == 1, commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[0] in ci, f"README's test command {commands[0]!r} is not a line of .ci/run"


def test_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README has {len(lines)} lines; move detail to docs/"
    for link in re.findall(r"\]\(((?:docs|bench)/[^)#]+)", README.read_text()):
        assert (ROOT / link).exists(), f"README links to missing {link}"
