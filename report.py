"""Results table of a sweep: `python report.py SWEEP_DIR [--baseline key=value] [--metrics ...]` (docs/ablations.md)."""

from embedlab.report.cli import main

if __name__ == "__main__":
    main()
