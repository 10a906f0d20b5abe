"""m2rl.agent"""
