"""report.html: the report folder's README as one self-contained page (plots embedded as data URIs,
so it opens from disk, as a mailed file and in MLflow's artifact viewer alike), with each cell's
verdict against the baseline and links to the runs in the MLflow UI.

The page is made from the README's Markdown, which ablate writes in a small subset (headings,
paragraphs, pipe tables, fenced code, lists, images, links, `code`, **bold**); the converter below
knows that subset and nothing more.
"""

from __future__ import annotations

import base64
import html
import math
import mimetypes
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; }
td.num, th.num { text-align: right; white-space: nowrap; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
code { background: #f6f6f6; padding: 0 0.2em; }
.higher { color: #176117; } .lower { color: #a11; }
"""


# ----------------------------------------------------------------------------- inline Markdown


def _inline(text: str, folder: Path) -> str:
    """One line of Markdown as HTML: images (embedded), links, `code`, **bold**; the rest escaped."""
    out, pos = [], 0
    pattern = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)|`([^`]+)`|\*\*(.+?)\*\*")
    for match in pattern.finditer(text):
        out.append(html.escape(text[pos:match.start()]))
        alt, src, label, href, code, bold = match.groups()
        if src is not None:
            out.append(f'<img alt="{html.escape(alt)}" src="{embedded(src, folder)}">')
        elif href is not None:
            out.append(f'<a href="{html.escape(href)}">{_inline(label, folder)}</a>')
        elif code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        else:
            out.append(f"<strong>{_inline(bold, folder)}</strong>")
        pos = match.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def embedded(src: str, folder: Path) -> str:
    """A data URI of the image file `src` (relative to `folder`); `src` itself when it is not a
    file there (a URL)."""
    path = folder / src
    if "://" in src or not path.is_file():
        return html.escape(src)
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


# ----------------------------------------------------------------------------- blocks


def _table(lines: list[str], folder: Path) -> str:
    """A pipe table (header, separator, rows) as an HTML table; right-aligned columns get class num."""
    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        return [part.strip().replace("\\|", "|") for part in parts]

    header, align, *rows = (cells(line) for line in lines)
    right = [a.endswith(":") and not a.startswith(":") for a in align]

    def row(values: list[str], tag: str) -> str:
        classes = [' class="num"' if r else "" for r in right]
        return "<tr>" + "".join(f"<{tag}{classes[i]}>{_inline(v, folder)}</{tag}>"
                                for i, v in enumerate(values)) + "</tr>"

    return "<table>\n" + row(header, "th") + "\n" + "\n".join(row(r, "td") for r in rows) + "\n</table>"


def markdown_html(text: str, folder: Path) -> str:
    """ablate's Markdown (the module docstring's subset) as HTML; images under `folder` embedded."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            blocks.append("<pre>" + html.escape("\n".join(lines[i + 1:end])) + "</pre>")
            i = end + 1
            continue
        block = []
        while i < len(lines) and lines[i].strip() and not lines[i].startswith("```"):
            block.append(lines[i])
            i += 1
        if not block:
            i += 1
            continue
        heading = re.match(r"(#{1,6}) (.*)", block[0])
        if heading:
            level = len(heading.group(1))
            blocks.append(f"<h{level}>{_inline(heading.group(2), folder)}</h{level}>")
            block = block[1:]
        if not block:
            continue
        if all(b.startswith("|") for b in block) and len(block) >= 2:
            blocks.append(_table(block, folder))
        elif all(b.startswith("- ") for b in block):
            blocks.append("<ul>" + "".join(f"<li>{_inline(b[2:], folder)}</li>" for b in block) + "</ul>")
        else:
            blocks.append("<p>" + "<br>\n".join(_inline(b, folder) for b in block) + "</p>")
    return "\n".join(blocks)


# ----------------------------------------------------------------------------- verdicts and links


def verdict(row: pd.Series, baseline: str) -> tuple[str, str]:
    """(css class, text) of one cell against the baseline from results.csv's AP_delta columns
    (fractions): higher or lower when the 95% CI of the difference excludes 0, else open."""
    if row["cell"] == baseline:
        return "", "baseline"
    delta, half = float(row.get("AP_delta", math.nan)), float(row.get("AP_delta_ci95", math.nan))
    if not math.isfinite(delta):
        return "", "not measured (no finished run on one side)"
    if not math.isfinite(half):
        return "", f"ΔAP {100 * delta:+.1f}: no interval (fewer than 2 seeds)"
    span = f"ΔAP {100 * delta:+.1f} [{100 * (delta - half):+.1f}, {100 * (delta + half):+.1f}]"
    if delta - half > 0:
        return "higher", f"higher than the baseline: {span}"
    if delta + half < 0:
        return "lower", f"lower than the baseline: {span}"
    return "", f"no difference shown (the interval contains 0): {span}"


def verdicts_html(results: pd.DataFrame, baseline: str) -> str:
    """Each cell's verdict against the baseline, as an HTML list."""
    items = []
    for _, row in results.iterrows():
        css, text = verdict(row, baseline)
        items.append(f'<li><strong>{html.escape(str(row["cell"]))}</strong>: '
                     f'<span class="{css}">{html.escape(text)}</span></li>')
    return ("<h2>Verdicts against the baseline</h2>\n<p>AP difference to the baseline "
            f"(<code>{html.escape(baseline)}</code>) in AP points with its 95% interval (paired over common seeds, "
            "else Welch), as in the table's ΔAP column.</p>\n<ul>" + "".join(items) + "</ul>")


def links_html(links: Sequence[tuple[str, str]], base: str) -> str:
    """The MLflow section: (label, absolute URL) per link."""
    items = "".join(f'<li><a href="{html.escape(url)}">{html.escape(label)}</a></li>' for label, url in links)
    return ("<h2>Runs in MLflow</h2>\n"
            f"<p>Pages of the MLflow UI at {html.escape(base)} (<code>ablate ui</code> serves them). "
            "MLflow's artifact viewer shows this page in a sandbox that follows no link: open the file "
            "from the report folder, or copy a link.</p>\n<ul>" + items + "</ul>")


def write_html(readme: Path, results: pd.DataFrame, baseline: str, out: Path,
               links: Sequence[tuple[str, str]] = (), base: str = "") -> Path:
    """report.html beside README.md: its Markdown as HTML, plots embedded, then the verdicts
    against `baseline` and `links` (label, URL) to the MLflow UI at `base`. Returns `out`."""
    body = markdown_html(readme.read_text(), readme.parent)
    # The verdicts go right after the results table's section, before the plots.
    verdicts = verdicts_html(results, baseline)
    body = body.replace("<h2>Plots</h2>", verdicts + "\n<h2>Plots</h2>", 1) if "<h2>Plots</h2>" in body \
        else body + "\n" + verdicts
    if links:
        body += "\n" + links_html(links, base)
    title = html.escape(readme.read_text().splitlines()[0].lstrip("# ").strip())
    out.write_text(f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n"
                   f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
    return out
