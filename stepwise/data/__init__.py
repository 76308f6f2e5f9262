"""Record I/O: strict JSONL reading with `path:line` errors, atomic writes, dataset loaders."""
