"""`m2rl/BFCL-v0`: the Berkeley Function Calling Leaderboard v4 (the `bfcl-eval` package), graded by its own
checkers. Importing `m2rl.envs.bfcl.env` registers the id; `checker.py` says which parts of bfcl-eval load."""
