"""ablate.report.html: the README's Markdown as one self-contained page, verdicts, links."""

from __future__ import annotations

import base64
import math

import pandas as pd

from ablate.report.html import embedded, markdown_html, verdict, write_html

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def test_markdown_subset_by_hand(tmp_path):
    (tmp_path / "ap.png").write_bytes(PNG)
    text = ("# gamma <sweep>\n\nFocal **loss**, see [results](results.csv).\n\n```bash\nablate run x\n```\n\n"
            "| gamma | AP | cell |\n|---:|---:|:---|\n| 2 | 31.5 ± 0.9 | g=2 \\| a |\n\n- **g=2**: `run1`\n- g=5\n\n"
            "AP:\n\n![ap](ap.png)\n")
    html = markdown_html(text, tmp_path)
    assert "<h1>gamma &lt;sweep&gt;</h1>" in html
    assert '<p>Focal <strong>loss</strong>, see <a href="results.csv">results</a>.</p>' in html
    assert "<pre>ablate run x</pre>" in html
    assert ('<tr><th class="num">gamma</th><th class="num">AP</th><th>cell</th></tr>\n'
            '<tr><td class="num">2</td><td class="num">31.5 ± 0.9</td><td>g=2 | a</td></tr>') in html
    assert "<ul><li><strong>g=2</strong>: <code>run1</code></li><li>g=5</li></ul>" in html
    assert f'<img alt="ap" src="data:image/png;base64,{base64.b64encode(PNG).decode()}">' in html


def test_an_image_that_is_not_a_file_there_keeps_its_address(tmp_path):
    assert embedded("missing.png", tmp_path) == "missing.png"
    assert embedded("http://h/x.png?a=1&b=2", tmp_path) == "http://h/x.png?a=1&amp;b=2"


def test_verdicts_by_hand():
    def row(cell, delta, half):
        return pd.Series({"cell": cell, "AP_delta": delta, "AP_delta_ci95": half})

    assert verdict(row("base", 0.0, 0.0), "base") == ("", "baseline")
    assert verdict(row("a", 0.02, 0.01), "base") == ("higher", "higher than the baseline: ΔAP +2.0 [+1.0, +3.0]")
    assert verdict(row("b", -0.02, 0.01), "base")[0] == "lower"
    assert verdict(row("c", 0.02, 0.03), "base")[1].startswith("no difference shown (the interval contains 0)")
    assert "fewer than 2 seeds" in verdict(row("d", 0.02, math.nan), "base")[1]
    assert verdict(row("e", math.nan, math.nan), "base")[1].startswith("not measured")


def test_the_page_has_the_readme_the_verdicts_before_the_plots_and_the_links(tmp_path):
    (tmp_path / "ap.png").write_bytes(PNG)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\n| AP | cell |\n|---:|:---|\n| 1.0 | a |\n\n## Plots\n\n![ap](ap.png)\n")
    results = pd.DataFrame({"cell": ["a", "b"], "AP_delta": [0.0, 0.05], "AP_delta_ci95": [0.0, 0.01]})
    out = write_html(readme, results, "a", tmp_path / "report.html",
                     [("runs of b", "http://127.0.0.1:5000/#/experiments/1/runs?x=1&y=2")], "http://127.0.0.1:5000")
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>x</title>" in page
    assert page.index("Verdicts against the baseline") < page.index("<h2>Plots</h2>") < page.index("data:image/png")
    assert "higher than the baseline: ΔAP +5.0 [+4.0, +6.0]" in page
    assert '<a href="http://127.0.0.1:5000/#/experiments/1/runs?x=1&amp;y=2">runs of b</a>' in page
    assert 'src="ap.png"' not in page  # nothing the page needs lies beside it
