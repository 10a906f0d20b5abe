"""m2rl.kernels"""
