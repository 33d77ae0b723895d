"""Training objectives, one module each, behind one interface (tasks/base.py).

The package imports nothing, so a stage runs (and DVC tracks) only the objectives it
uses: tasks/pretraining.py picks one by `model.family`, tasks/finetuning.py by
`finetune.task`.

pretraining, chosen by `model.family`:
  causal_lm  decoders: next-token prediction on the token stream
  masked_lm  encoders: BERT's masked-LM objective
fine-tuning, chosen by `finetune.task`:
  sft        conversations (reasoning-gym problems, chatterbot), loss on assistant turns
  classify   text -> label (TREC, WordNet glosses), ...ForSequenceClassification
  preference pairs of a chosen and a rejected reply: DPO, IPO, hinge, robust DPO, SimPO
"""
