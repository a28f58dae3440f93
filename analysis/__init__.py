"""Altair charts built from saved queries' results, written as HTML, PNG and SVG."""
