"""The one training loop (every loss plugin), its engine (model + DDP + optimizer + scheduler), batches."""
