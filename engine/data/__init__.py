"""Training data: input sources (folders, archives, CSVs, token folders), token datasets, the built-in generated corpus."""
