"""Offline evaluation: sweeps of arms over shared prompts and seeds, a scoring stage, statistics, a static report.

`spec` (the typed sweep spec), `arms` (arms -> ordinary jobs), `scorers` and `scoring` (per-image scores on Ray
actors), `distribution` (FID/KID per arm), `stats`, `report` and `plots` (the HTML report), `export` (other
suites' folder layouts), `tiny` (random-weight scorer models for tests and the demo), `sweep` (the steps in order).
"""
