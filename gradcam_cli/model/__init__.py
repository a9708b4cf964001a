"""Models: a name, a factory or a checkpoint -> a `LoadedModel` (module, preprocessing, class names, layers).

Nothing here is imported with the package: `labels` and `catalog` need no torch, the rest does.
"""
