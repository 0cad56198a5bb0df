"""docs/BENCHMARKS.md is generated from the committed results (``python -m bench.report``) and is
never stale: a new result under bench/results/ must be committed with the regenerated page."""
from bench.report import BENCHMARKS_MD, benchmarks_markdown, main


def test_benchmarks_page_is_up_to_date():
    assert BENCHMARKS_MD.read_text() == benchmarks_markdown(), "docs/BENCHMARKS.md is stale: run python -m bench.report"


def test_check_flag_reports_a_stale_page(tmp_path, capsys):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# old\n")
    assert main(["--check", "--out", str(page)]) == 1
    assert main(["--out", str(page)]) == 0
    assert main(["--check", "--out", str(page)]) == 0
    text = page.read_text()
    assert "## Static kernel report" in text and "**linear_logprobs**" in text
