"""`python -m modelpress.cli`, the same as the `modelpress` command."""

from modelpress.cli import main

main()
