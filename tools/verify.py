#!/usr/bin/env python
"""`glm-tp-verify` from a source checkout: see glm_tp/cli/verify.py."""
import sys

import _common  # noqa: F401 - makes glm_tp importable from a source checkout

from glm_tp.cli.verify import main

if __name__ == "__main__":
    sys.exit(main())
