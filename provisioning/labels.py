"""Printable labels: the device id as a QR code plus the pole, as SVG and PNG.

A technician sticks it on the pole's enclosure; scanning it gives the device id
the registry, the gateway logs and MQTT topics all use.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

import segno


def make_label(directory: Path, device: str, pole: str, site: str = "") -> list[Path]:
    """Write <device>.svg (QR and text) and <device>.png (QR); returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    qr = segno.make(device, error="m")
    png = directory / f"{device}.png"
    qr.save(png, kind="png", scale=8, border=2)
    scale = 4
    size = qr.symbol_size(scale=scale, border=2)[0]
    inner = qr.svg_inline(scale=scale, border=2)
    width, height = size + 260, max(size, 110)
    text = [f'<text x="{size + 10}" y="34" font-family="monospace" font-size="18" '
            f'font-weight="bold">{escape(device)}</text>',
            f'<text x="{size + 10}" y="64" font-family="sans-serif" font-size="16">'
            f'pole {escape(pole)}</text>']
    if site:
        text.append(f'<text x="{size + 10}" y="90" font-family="sans-serif" font-size="14">'
                    f'site {escape(site)}</text>')
    svg = (f'<?xml version="1.0" encoding="utf-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
           f'<rect width="100%" height="100%" fill="#fff"/>{inner}{"".join(text)}</svg>\n')
    out = directory / f"{device}.svg"
    out.write_text(svg)
    return [out, png]
