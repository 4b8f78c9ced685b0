"""Data: loading and record schemas, task generators, tokenization, batching, metrics."""
