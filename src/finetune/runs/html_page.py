"""One self-contained HTML page: headings, text, tables and PNGs embedded as base64, the style
inline. It opens from disk with no server and asks the network for nothing, so a report can
be mailed or archived as one file. Nothing in it depends on the clock: the same inputs write
the same bytes. `inspect` and `compare --html` both write theirs with it."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from finetune.files import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
figcaption, .note { color: #555; font-size: 0.9em; }
.wide { overflow-x: auto; }
"""


@dataclass
class Page:
    """A page built top to bottom; `write` puts it on disk atomically."""

    title: str
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, note: bool = False) -> None:
        css = ' class="note"' if note else ""
        self.parts.append(f"<p{css}>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, frame: pd.DataFrame, index: bool = False, digits: int = 4) -> None:
        """Floats to `digits` significant digits, empty cells as `-`, every cell escaped; a wide
        table scrolls inside the page."""
        cells = frame.infer_objects().to_html(  # inferred: None in a column of objects would print `None`
            index=index, escape=True, na_rep="-", float_format=lambda v: f"{v:.{digits}g}", border=0
        )
        self.parts.append(f'<div class="wide">{cells}</div>')

    def image(self, png: bytes, caption: str) -> None:
        data = base64.b64encode(png).decode("ascii")
        alt = html.escape(caption, quote=True)
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
        )

    def image_file(self, path: Path, caption: str) -> None:
        self.image(Path(path).read_bytes(), caption)

    def figure(self, fig: Figure, caption: str, dpi: int = 100) -> None:
        self.image(figure_png(fig, dpi), caption)

    def render(self) -> str:
        title = html.escape(self.title)
        body = "\n".join(self.parts)
        return (
            f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: Path) -> Path:
        atomic_write_text(path, self.render())
        return path


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; matplotlib writes no date into a PNG, so the bytes repeat."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
