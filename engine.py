"""kiln.Engine: the offline API, running the same engine process and tokenizer side as the server."""

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from kiln.serving.engine_client import EngineClient
from kiln.serving.protocol import GenerateReqInput
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer
from kiln.serving.tokenizer_manager import TokenizerManager


class Engine:
    """`Engine(model_path=...).generate(prompts, sampling_params)` returns what /generate returns.

    Keyword arguments are ServerArgs fields (dtype, max_total_tokens, ...).
    """

    def __init__(self, **kwargs: Any):
        self.args = ServerArgs(**kwargs)
        self._client = EngineClient(self.args)
        tokenizer = load_tokenizer(self.args.tokenizer_path or self._client.info["checkpoint"])
        self.tokenizer_manager = TokenizerManager(self._client, tokenizer, self.args.weight_version)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="kiln-engine-loop")
        self._thread.start()
        self._client.start_reader(self._loop)

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        obj = GenerateReqInput(text=prompt, input_ids=input_ids, sampling_params=sampling_params)
        reqs, is_batch = self.tokenizer_manager.parse(obj)
        results = self._run(self.tokenizer_manager.run_all(reqs))
        return results if is_batch else results[0]

    def shutdown(self) -> None:
        self._client.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
