"""The model side: policy, tokenizer and chat formats, LoRA, generation and training backends."""
