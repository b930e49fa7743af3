"""Reading results: run directories (runs.py), speedups from validation curves (speedup.py),
plots of runs and sweeps (plot.py, `python -m snoo_train.analysis.plot`). Never imported by training."""
