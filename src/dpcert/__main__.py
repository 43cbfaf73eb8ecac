"""``python -m dpcert``: the command line."""

from dpcert.cli import main

if __name__ == "__main__":
    main()
