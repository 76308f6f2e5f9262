"""Megatron distributed checkpoints: atomic publication, `latest` pointer, model/optimizer/scheduler/RNG state."""
