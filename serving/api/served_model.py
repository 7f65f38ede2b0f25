"""What the server says it serves. An update from disk changes the path, the name and the weight version."""

from dataclasses import dataclass
from typing import Any

from kiln.serving.messages import EngineInfo
from kiln.serving.server_args import ServerArgs


@dataclass
class ServedModel:
    path: str
    tokenizer_path: str
    name: str  # /v1/models' id and every OpenAI response's `model`
    weight_version: str
    info: EngineInfo
    fixed_name: bool  # --served-model-name was given: the name outlives updates

    @classmethod
    def for_args(cls, args: ServerArgs, info: EngineInfo) -> "ServedModel":
        path = args.model_path or info.checkpoint
        return cls(path, args.tokenizer_path or path, args.served_model_name or path, args.weight_version, info, args.served_model_name is not None)

    def model_info(self) -> dict[str, Any]:
        """/get_model_info, field for field as SGLang."""
        return {
            "model_path": self.path,
            "tokenizer_path": self.tokenizer_path,
            "is_generation": self.info.model_kind == "generation",
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": self.info.model_type,
            "architectures": self.info.architectures,
        }

    def weights_updated(self, path: str, weight_version: str | None) -> None:
        self.path = path
        if not self.fixed_name:
            self.name = path
        if weight_version is not None:
            self.weight_version = weight_version
