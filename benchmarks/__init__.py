"""m2rl.benchmarks"""
