"""The HTTP side's start-up overlaps the engine's: it starts once the engine is spawned, and the engine says where its
checkpoint is before it loads weights."""

import json

from kiln.serving.api.engine_client import EngineClient
from kiln.serving.api.engine_group import EngineGroup
from kiln.serving.messages import CheckpointLocated
from kiln.serving.server_args import ServerArgs

SHAPE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


def test_while_loading_starts_at_spawn_and_hears_the_checkpoint_before_the_engine_is_ready(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE}))
    args = ServerArgs(
        model_path=str(tmp_path), load_format="dummy", dtype="float32", max_total_tokens=1024, max_running_requests=4, disable_compile=True,
    )  # fmt: skip
    events: list[object] = []
    wait_ready = EngineClient.wait_ready

    def recorded_wait_ready(self: EngineClient):
        info = wait_ready(self)
        events.append("ready")
        return info

    monkeypatch.setattr(EngineClient, "wait_ready", recorded_wait_ready)
    spawned: list[EngineClient] = []
    init = EngineClient.__init__

    def recorded_init(self: EngineClient, *a, **k):
        init(self, *a, **k)
        spawned.append(self)

    monkeypatch.setattr(EngineClient, "__init__", recorded_init)

    def while_loading(located):
        # Called as soon as the engine is spawned, before it has said where its checkpoint is: the HTTP side
        # imports its own modules meanwhile, then waits for the checkpoint.
        events.append("spawned, not located" if spawned[0].located is None else "late")
        events.append(located())

    group = EngineGroup.start(args, while_loading)
    try:
        # The callback ran once, before the engine was ready, with what EngineInfo then confirmed: a dummy
        # model's config folder, and no tokenizer (the folder has none).
        assert events == ["spawned, not located", CheckpointLocated(str(tmp_path), False), "ready"]
        assert group.info.checkpoint == str(tmp_path) and group.info.limits.has_tokenizer is False
    finally:
        group.shutdown()
