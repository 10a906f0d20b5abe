"""m2rl: agentic RL environments and rollouts for MiniMax-M2-style tool agents."""

__version__ = "0.1.0"
