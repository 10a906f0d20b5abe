"""Evaluation: `m2rl eval`, its results and reports, and the trajectory viewer."""
