"""`python -m periphery_app`."""

import sys

from periphery_app.main import main

sys.exit(main())
