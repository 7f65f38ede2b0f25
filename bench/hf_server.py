"""A transformers peer behind SGLang's native streaming /generate, so the serving benchmark drives it like any server.

    python -m kiln.bench.hf_server --model PATH --port 30500 --mode single|batched [--dtype bfloat16]

single: one request at a time, in arrival order (what `generate` in a loop gives).
batched: every request waiting when a batch starts runs in one left-padded `generate` call (static
batching: newcomers wait for the whole batch to finish). Greedy; EOS is ignored, as the benchmark asks.
Each chunk reports the output tokens so far in meta_info.completion_tokens; the text is sent at the end.
"""

import argparse
import json
import queue
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer


@dataclass
class Job:
    input_ids: list[int]
    max_new_tokens: int
    out: queue.Queue = field(default_factory=queue.Queue)  # token counts so far, then the text (a str) or an exception


class RowStreamer(BaseStreamer):
    """Hands each row's newest token to its job; a job that has all it asked for gets its text and is done."""

    def __init__(self, jobs: list[Job], tokenizer: PreTrainedTokenizerBase):
        self.jobs, self.tokenizer = jobs, tokenizer
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate's first call passes the prompt
            self.seen_prompt = True
            return
        for job, ids, token in zip(self.jobs, self.ids, value.view(-1).tolist()):
            if len(ids) == job.max_new_tokens:
                continue
            ids.append(token)
            job.out.put(len(ids))
            if len(ids) == job.max_new_tokens:
                job.out.put(self.tokenizer.decode(ids, skip_special_tokens=True))

    def end(self) -> None:
        pass


class Worker:
    def __init__(self, model_path: str, dtype: str, batched: bool):
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
        self.batched = batched
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while self.batched and not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            try:
                self.run(jobs)
            except Exception as exc:  # the jobs' handlers report it; the worker serves the next batch
                for job in jobs:
                    job.out.put(exc)

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> None:
        enc = self.tokenizer.pad({"input_ids": [j.input_ids for j in jobs]}, padding_side="left", return_tensors="pt")
        n = max(j.max_new_tokens for j in jobs)
        pad = self.tokenizer.eos_token_id
        self.model.generate(**enc, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=pad, streamer=RowStreamer(jobs, self.tokenizer))


def handler(worker: Worker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/generate" or not body.get("stream"):
                self.send_error(400, "this peer serves streaming /generate only")
                return
            ids = body.get("input_ids") or worker.tokenizer(body["text"]).input_ids
            job = Job(ids, body["sampling_params"]["max_new_tokens"])
            worker.jobs.put(job)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            while True:
                item = job.out.get()
                if isinstance(item, Exception):
                    chunk = {"error": {"message": str(item)}}
                elif isinstance(item, str):
                    chunk = {"text": item, "meta_info": {"completion_tokens": job.max_new_tokens, "finish_reason": {"type": "length"}}}
                else:
                    chunk = {"text": "", "meta_info": {"completion_tokens": item, "finish_reason": None}}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
                if not isinstance(item, int):
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


class Server(ThreadingHTTPServer):
    # The default listen backlog of 5 resets connections when dozens of requests arrive at once.
    request_queue_size = 1024
    daemon_threads = True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kiln.bench.hf_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["single", "batched"], default="single")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    worker = Worker(args.model, args.dtype, args.mode == "batched")
    Server((args.host, args.port), handler(worker)).serve_forever()


if __name__ == "__main__":
    main()
