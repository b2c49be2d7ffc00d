"""Data layer: readers, tokenization, batching, synthetic tasks.

tokenizer.py      Tokenizer: tokenizers-backed encode/decode with explicit BOS, chat templates
chat_template.py  sandboxed jinja2 rendering of a checkpoint's chat template
preference.py     read_preference_pairs: HH-RLHF / TRL JSONL -> PreferencePair, with a ReadReport
batching.py       tokenize_pairs -> fixed-shape pair arrays; PairBatcher, a resumable iterator
"""
