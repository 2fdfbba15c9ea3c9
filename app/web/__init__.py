"""The web layer: HTML pages and the JSON API."""
