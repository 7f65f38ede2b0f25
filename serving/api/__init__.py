"""The HTTP process: app, controllers, validator, tokenizer side, engine client. Imports no torch."""
