"""Fine-tuning data selection: which training examples a model is tuned on, judged by the
starting model itself (finetune.selection).

Steps, applied in the order configured, to the training split only (never val or test):

  dedup      exact and near duplicates (the clean stage's MinHash dedup) of the prompts,
             then of whole examples; the first copy in data order stays
  quality    empty or over-long turns, responses that repeat their prompt, responses that
             are mostly non-text (lmpipe.selection.rules)
  ifd        Instruction-Following Difficulty (Cherry LLM): IFD >= max is dropped, the
             rest ranked by it, most difficult first
  diversity  k-center greedy over the starting model's mean-pooled hidden states, up to
             the budget

and a budget in examples or tokens. Scores come from one cached pass of the starting model
(lmpipe.selection.scoring). The result is a table of every training example with its
scores and why it was kept or dropped (outputs/finetune/selection.parquet).
"""
