"""``python -m auxilia.architectures RESULTS [OUT]``: α statistics and heat maps of a results directory."""

import sys

from .analysis import report_alpha

if len(sys.argv) < 2:
    sys.exit("usage: python -m auxilia.architectures RESULTS_DIR_OR_JSONL [OUT_DIR]")
print(report_alpha(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
