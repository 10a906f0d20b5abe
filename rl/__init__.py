"""m2rl.rl"""
