"""Speed and memory measurements (not tests): train_step.py and inference.py; see docs/performance.md."""
