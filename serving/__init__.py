"""The serving stack: HTTP app, tokenizer side, engine process, scheduler."""
