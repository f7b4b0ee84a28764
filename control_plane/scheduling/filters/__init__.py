"""Filters: which workers may take a request at all."""
