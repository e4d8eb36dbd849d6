"""``python -m nora_core.cli``: the ``nora`` command."""

from nora_core.cli.main import main

main()
