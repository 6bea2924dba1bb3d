#!/usr/bin/env python
"""`glm-tp-repartition` from a source checkout: see glm_tp/cli/convert.py."""
import _common  # noqa: F401 - makes glm_tp importable from a source checkout

from glm_tp.cli.convert import repartition_main

if __name__ == "__main__":
    repartition_main()
