"""Ray Data input path: read JSONL shards, validate, format, tokenize, mask, account."""
