"""stepwise: step-level offline RL (Skywork DAPO, DQO) for 7B-72B language models on megatron-core."""

__version__ = "0.1.0"
