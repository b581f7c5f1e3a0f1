//! Training data from JSONL files.
