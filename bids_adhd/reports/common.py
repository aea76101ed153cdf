"""What the HTML reports share: matplotlib without a display, figures as PNG bytes, and PNGs
embedded as ``data:`` URIs (a report loads nothing from the network)."""
from __future__ import annotations

import base64
import html
import io


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, **savefig) -> bytes:
    """``fig`` as PNG bytes (``savefig`` keywords passed on); the figure is closed."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    plt.close(fig)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` as a data: URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def fmt(v, nd: int = 3) -> str:
    """A number for a report table: ``n/a`` for None, else ``nd`` decimals."""
    return "n/a" if v is None else f"{v:.{nd}f}"


def figure_png(fig) -> bytes:
    """A report figure as PNG bytes (100 dpi, tight bounding box)."""
    return png_bytes(fig, dpi=100, bbox_inches="tight")
