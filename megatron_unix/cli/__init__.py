"""The command-line programs. Each is ``python -m megatron_unix.cli.NAME``, a console script of the
package (``unix-NAME``; see pyproject.toml) and a thin file in ``tools/`` (``pretrain_unix.py`` at the top)."""
