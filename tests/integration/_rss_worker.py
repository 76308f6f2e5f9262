"""Worker: one streamed conversion in a fresh process, printing its summary with the peak RSS before
(everything imported, process group up) and after.

    python _rss_worker.py hf-to-megatron|megatron-to-hf SRC OUT
"""
import json
import sys

if __name__ == "__main__":
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401  (imported before the baseline)
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import tqdm  # noqa: F401

    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron, peak_rss_mb
    from stepwise.convert.megatron_to_hf import convert_megatron_to_hf
    from stepwise.parallel.runtime import init_parallel

    direction, source, out = sys.argv[1:4]
    init_parallel(1, 1)
    baseline = peak_rss_mb()
    if direction == "hf-to-megatron":
        summary = convert_hf_to_megatron(source, out, progress=False)
    else:
        summary = convert_megatron_to_hf(source, out, max_shard_size="40MB", progress=False)
    print(json.dumps({"baseline_rss_mb": baseline, **summary}))
