"""Render: maps -> heatmaps, overlays and guided pictures as bytes, and a batch's results -> rows and files.

`colormaps` imports no numpy at import time (config validation reads its names); the rest needs torch.
"""
