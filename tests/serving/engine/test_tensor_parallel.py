"""Tensor parallelism on the CPU (gloo, 2 ranks) through the real `kiln serve`: the tokens match one rank's,
on one node and on two "nodes" on loopback; a rank's death ends the server with code 1 and a log line;
a rendezvous nobody reaches fails start-up within --dist-timeout, naming the address.

The model is a tiny random Llama with one KV head (replicated on both ranks, its 4 query heads split two
each), served from input ids.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.serving.engine.core import EngineCore
from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

SHAPE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
)  # fmt: skip
PROMPTS = [[5, 9, 13, 70, 2], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
NEW_TOKENS = 8
COMMON = ["--skip-tokenizer-init", "--dtype", "float32", "--disable-compile", "--max-total-tokens", "1024", "--max-running-requests", "4"]
KILN = str(Path(sys.executable).with_name("kiln"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_rank_tokens(model: Path) -> list[list[int]]:
    """Greedy tokens of an in-process engine with no tensor parallelism, the reference."""
    core = EngineCore(ServerArgs(model_path=str(model), skip_tokenizer_init=True, dtype="float32", disable_compile=True, max_total_tokens=1024))
    for i, ids in enumerate(PROMPTS):
        core.add(GenerateRequest(str(i), ids, SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    while core.has_work:
        for o in core.step():
            out.setdefault(o.rid, []).extend(o.new_ids)
    return [out[str(i)] for i in range(len(PROMPTS))]


def _served_tokens(url: str) -> list[list[int]]:
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    resp = httpx.post(f"{url}/generate", json={"input_ids": PROMPTS, "sampling_params": params}, timeout=60, trust_env=False)
    assert resp.status_code == 200, resp.text
    return [r["output_ids"] for r in resp.json()]


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pid {proc.pid} still running {timeout}s later")


def test_two_ranks_serve_one_ranks_tokens_and_a_dead_rank_ends_the_server(model, one_rank_tokens, launch_kiln_process):
    with launch_kiln_process(["--model-path", str(model), "--tp-size", "2", *COMMON]) as server:
        assert _served_tokens(server.url) == one_rank_tokens
        log = server.log()
        pid = int(log.split("started tensor-parallel rank 1 (pid ")[1].split(")")[0])
        os.kill(pid, signal.SIGKILL)
        assert _wait_exit(server.proc, 30) == 1
        assert "tensor-parallel rank 1 is gone (exit code -9)" in server.log()


def test_two_nodes_on_loopback_serve_one_ranks_tokens(model, one_rank_tokens, launch_kiln_process, tmp_path):
    addr = f"127.0.0.1:{_free_port()}"
    nodes = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", addr]
    with open(tmp_path / "node1.log", "wb") as log:
        node1 = subprocess.Popen(
            [KILN, "serve", "--model-path", str(model), *nodes, "--node-rank", "1", *COMMON], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )  # fmt: skip
    try:
        with launch_kiln_process(["--model-path", str(model), *nodes, "--node-rank", "0", *COMMON]) as server:
            assert _served_tokens(server.url) == one_rank_tokens
            server.proc.send_signal(signal.SIGTERM)
            assert _wait_exit(server.proc, 30) == 0
        # Rank 0 stopped the headless node's rank on its way out: that node ends cleanly.
        assert _wait_exit(node1, 30) == 0, (tmp_path / "node1.log").read_text()
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)


def test_a_rendezvous_nobody_reaches_fails_start_up_in_time(model):
    """Node 1 alone: nothing listens at node 0's address."""
    addr = f"127.0.0.1:{_free_port()}"
    cmd = [KILN, "serve", "--model-path", str(model), "--tp-size", "2", "--nnodes", "2", "--node-rank", "1"]
    cmd += ["--dist-init-addr", addr, "--dist-timeout", "3", *COMMON]
    t0 = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, start_new_session=True)
    assert result.returncode == 1, result.stderr
    # Imports and process starts take some seconds on a loaded CI box; the wait itself is 3.
    assert time.monotonic() - t0 < 40
    assert addr in result.stderr and "within 3s" in result.stderr, result.stderr[-3000:]


def test_flags_that_do_not_fit_together_are_refused():
    for argv, message in [
        (["--tp-size", "3", "--nnodes", "2"], "--tp-size 3 does not split evenly over --nnodes 2"),
        (["--tp-size", "2", "--nnodes", "2"], "--nnodes > 1 needs --dist-init-addr"),
        (["--nnodes", "2", "--node-rank", "2", "--tp-size", "2", "--dist-init-addr", "h:1"], "--node-rank 2 is not among the 2 nodes"),
        (["--dist-init-addr", "nohost"], "is not host:port"),
        (["--tp-size", "2", "--enable-overlap-schedule"], "--enable-overlap-schedule does not run with --tp-size > 1"),
    ]:
        with pytest.raises(ValueError, match=message.replace("+", r"\+")):
            ServerArgs(**vars(ServerArgs.parser().parse_args(argv)))


def test_a_rank_replays_rank_0s_table_writes():
    pools = [KVPool(64, 1, 1, 4, torch.float32, torch.device("cpu"), 4, 32) for _ in range(2)]
    pools[0].table_writes = []
    pools[0].alloc_slots(2, 0, 5)
    pools[0].set_slots(1, 3, torch.tensor([7, 8]))
    pools[0].alloc_slots(2, 5, 1)
    pools[1].apply_table_writes(pools[0].take_table_writes())
    assert torch.equal(pools[1].req_to_token, pools[0].req_to_token) and pools[0].req_to_token.any()
    assert pools[0].take_table_writes().numel() == 0


def test_the_other_rank_computes_the_same_kv_as_rank_0(model, tmp_path):
    """Both ranks' pools hold the same K/V at every slot the table names: the other rank rebuilt each step's
    inputs and request table (cached prefixes, chunked prompts, prompt-logprob rows) as rank 0 had them."""
    port = str(_free_port())
    script = Path(__file__).with_name("tp_pair.py")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), port, str(model), str(tmp_path / f"rank{rank}.pt")], start_new_session=True)
        for rank in (0, 1)
    ]
    try:
        assert [_wait_exit(p, 90) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert torch.equal(ranks[0]["table"], ranks[1]["table"])
    slots = ranks[0]["table"].unique()
    assert len(slots) > 600 and len(ranks[0]["tokens"]) == 6
    for name in ("k", "v"):
        assert torch.equal(ranks[0][name][:, slots], ranks[1][name][:, slots])
