"""The training loop (loop.py) and the small units it calls, one job each."""
