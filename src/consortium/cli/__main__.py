"""``python -m consortium.cli``: the same as the ``consortium`` command."""

from consortium.cli import main

if __name__ == "__main__":
    main()
