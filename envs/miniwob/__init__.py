"""`m2rl/MiniWoB-v0`: Farama's MiniWoB++ browser tasks (the `miniwob` wheel's pages), graded by the pages.

dom.py renders the page's own DOM listing; page.py serves the pages and runs one episode in the project's
Chromium; env.py is the `ToolEnv`; experts.py holds the scripted solvers and the random clicker.
"""
