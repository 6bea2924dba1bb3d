#!/usr/bin/env python
"""`glm-tp-quantize` from a source checkout: see glm_tp/cli/convert.py."""
import _common  # noqa: F401 - makes glm_tp importable from a source checkout

from glm_tp.cli.convert import quantize_main

if __name__ == "__main__":
    quantize_main()
