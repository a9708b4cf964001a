"""OUT, the output folder: the only code that knows its file names, writes into it, or reads it back.

No torch and no models here: `names`, `table` (predictions.csv and its Row), `files` (atomic writes),
`writer`, `manifest` (run.json), `resume`, `merge` (rank CSVs) and `folder`, which puts them together.
"""
