"""Imported once by test_checkpoint_faults' forkserver, so each of its 42 forked runs finds WBCAtt's
parser built, as a long-lived process would (building it takes 1.1 s of a ~3 s run on a 2-core EPYC)."""

from hemcap.parsing import compiled_parser

compiled_parser("wbcatt")
