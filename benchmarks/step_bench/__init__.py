"""The parts of benchmarks/train_step.py: one cell runner (cells.py) and one module per thing measured."""
