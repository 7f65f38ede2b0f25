"""kiln.Engine: the offline API, running the same engine process and tokenizer side as the server."""

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from kiln.serving.api.engine_group import EngineGroup
from kiln.serving.api.schemas import GenerateReqInput
from kiln.serving.api.served_model import ServedModel
from kiln.serving.api.tokenizer_manager import TokenizerManager
from kiln.serving.api.validator import Validator
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer


class Engine:
    """`Engine(model_path=...).generate(prompts, sampling_params)` returns what /generate returns.

    Keyword arguments are ServerArgs fields (dtype, max_total_tokens, ...).
    """

    def __init__(self, **kwargs: Any):
        self.args = ServerArgs(**kwargs)
        self._client = EngineGroup.start(self.args)
        info = self._client.info
        tokenizer = load_tokenizer(self.args.tokenizer_path or info.checkpoint)
        validator = Validator.for_tokenizer(info.limits, self.args.max_n, tokenizer)
        served = ServedModel.for_args(self.args, info)
        self.tokenizer_manager = TokenizerManager(self._client, tokenizer, validator, served, None)
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
        params = None
        if sampling_params is not None:
            params = [SamplingParams(**p) for p in sampling_params] if isinstance(sampling_params, list) else SamplingParams(**sampling_params)
        obj = GenerateReqInput(text=prompt, input_ids=input_ids, sampling_params=params)

        async def run() -> list[dict[str, Any]]:
            reqs, is_batch = await self.tokenizer_manager.parse(obj)
            results = await self.tokenizer_manager.run_all(reqs)
            return results if is_batch else results[0]

        return self._run(run())

    def shutdown(self) -> None:
        self._client.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
