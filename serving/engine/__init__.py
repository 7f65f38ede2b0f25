"""The engine process: scheduler, model runner, sampler, KV pool, radix cache, grammars."""
