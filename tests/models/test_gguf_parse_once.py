"""While transformers converts a GGUF, every reader it opens on the file is the one parse."""

import gguf
import numpy as np

from kiln.models.gguf_parse_once import gguf_parsed_once


def write_gguf(path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_one_reader_per_file_inside_and_fresh_readers_after(tmp_path):
    write_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf")
    with gguf_parsed_once():
        first = gguf.GGUFReader(tmp_path / "a.gguf")
        # The same file by another spelling is the same reader; another file gets its own.
        assert gguf.GGUFReader(str(tmp_path / "x" / ".." / "a.gguf")) is first
        assert gguf.GGUFReader(tmp_path / "b.gguf") is not first
        assert [t.name for t in first.tensors] == ["token_embd.weight"]
        assert np.array_equal(first.tensors[0].data.reshape(2, 4), np.arange(8, dtype=np.float32).reshape(2, 4))
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf.GGUFReader(tmp_path / "a.gguf") is not first
