"""The circuits engine: model reading, hook sites, scoring, accumulation, patching, memory planning and the
validation of examples. Nothing here is public API; the public face is `circuits/__init__.py`."""
