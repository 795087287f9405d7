"""Datasets: training folders, evaluation benchmarks, mixed sampling, synthetic scenes."""
