"""Data: which images a run explains (`discover`), decoding them (`decode`, `device`), and batches (`batches`)."""
