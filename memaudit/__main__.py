"""``python -m memaudit``: the command line, as the ``memaudit`` script runs it."""

from memaudit.cli import run

if __name__ == "__main__":
    run()
