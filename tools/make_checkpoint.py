#!/usr/bin/env python
"""`glm-tp-make-checkpoint` from a source checkout: see glm_tp/cli/make_checkpoint.py."""
import _common  # noqa: F401 - makes glm_tp importable from a source checkout

from glm_tp.cli.make_checkpoint import main

if __name__ == "__main__":
    main()
