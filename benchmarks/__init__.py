"""lr_quant benchmarks: speed, memory, accuracy and export size (not tests).

Run ``python -m benchmarks.run [--quick] [--out benchmarks/results]`` from the repo root.
"""
