"""Data layer: readers, tokenization, batching, synthetic tasks.

tokenizer.py      Tokenizer: tokenizers-backed encode/decode with explicit BOS, chat templates
chat_template.py  sandboxed jinja2 rendering of a checkpoint's chat template
preference.py     read_preference_pairs: HH-RLHF / TRL JSONL -> PreferencePair, with a ReadReport
batching.py       tokenize_pairs -> fixed-shape pair arrays; PairBatcher, a resumable iterator
records.py        readers of unpaired feedback, prompts (+ answers) and rated responses
tfds_builders.py  array_record TFDS builders of those records (no TensorFlow needed)
pipeline.py       GrainLoader (seeded, sharded, resumable), cached tokenization
synthetic.py      the counting task: random prompts, a hidden linear gold reward, BT labels
arithmetic.py     generated arithmetic prompts with answers ("What is 23 + 58?")
prompts.py        PromptSampler (each prompt once per epoch), group helpers, DAPO's flat-group filter
"""
