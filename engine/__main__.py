"""Allow `python -m engine ...` as an alias of the `crystallab` console script."""

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
