"""The look and the security policy shared by every generated HTML page (reports and the leaderboard):
self-contained pages that load nothing from anywhere."""

from __future__ import annotations

#: Base style of every page; pages append their own rules.
BASE_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}"
            "table{border-collapse:collapse;font-size:14px;margin:0.5em 0 1.5em}"
            "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}")


def content_security_policy(scripts: bool = False) -> str:
    """Nothing may be fetched; inline styles and data: images only, and inline scripts where a page
    needs them (the leaderboard's column sorting)."""
    script = "script-src 'unsafe-inline'; " if scripts else ""
    return (f"default-src 'none'; style-src 'unsafe-inline'; {script}img-src data:; "
            "base-uri 'none'; form-action 'none'")
