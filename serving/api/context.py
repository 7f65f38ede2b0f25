"""Everything a route handler needs, built once at start-up and handed to each controller."""

import time
from dataclasses import dataclass, field

from kiln.serving.api.engine_group import EngineGroup
from kiln.serving.api.metrics import ServingMetrics
from kiln.serving.api.openai_serving import OpenAIServing
from kiln.serving.api.pooled_serving import EmbeddingServing
from kiln.serving.api.tokenizer_manager import TokenizerManager
from kiln.serving.server_args import ServerArgs


@dataclass
class ServingContext:
    args: ServerArgs
    engine: EngineGroup
    tm: TokenizerManager
    oai: OpenAIServing
    pooled: EmbeddingServing
    metrics: ServingMetrics | None
    start_time: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        return self.engine.info.model_kind
