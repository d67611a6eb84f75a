"""`python -m sdexport ...` = the `sdexport` command."""

from sdexport.cli import main

main()
