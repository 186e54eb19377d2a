"""`python -m gateway`: the same CLI as the `gateway` console script.

See gateway/cli.py.
"""

from gateway.cli import main

raise SystemExit(main())
