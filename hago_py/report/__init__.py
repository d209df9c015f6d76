"""Reports: per-layer decisions, artifact check, measured latency (Markdown + JSON + HTML)."""
from .write import render_markdown, write_report

__all__ = ["render_markdown", "write_report"]
