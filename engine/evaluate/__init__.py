"""Judging generated crystals: validity checks, set metrics, the evaluation pool, CSP benchmark, sweeps, reports."""
