"""`stepwise eval`: greedy zero-shot accuracy / pass@1 of exported HF models on the paper's math and code
benchmarks (loaders: stepwise.data.benchmarks), with 95% Wilson intervals (`stats`), per-sample JSONL and
markdown tables in the paper's layout (`tables`); `run` drives the sampler replicas and the graders."""
