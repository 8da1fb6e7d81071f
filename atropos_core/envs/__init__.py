"""Built-in offline environments and the tiny local model/tokenizer they run with."""
