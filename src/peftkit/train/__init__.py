"""The fine-tuning application behind ``peftkit train`` (the library never imports it).

options (flags and config files) -> data (rows, prompts, labels, batches) -> loop (the one training loop)
-> evaluate (loss, exact match) -> report; default_model converts the embedded SmolLM2 once; methods maps
``--method`` names to library configs; commands holds generate / eval / merge / info.
"""
