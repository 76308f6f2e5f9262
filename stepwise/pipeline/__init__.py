"""Stages and the runner: each stage reads its inputs' manifests, writes outputs + a manifest, and is
skipped when its manifest matches (same config slice, same inputs, same code version)."""
