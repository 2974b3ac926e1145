"""LLM backends (analysis.llm_backends): the embedded SmolLM2-135M-Instruct run locally, and HTTPBackend against a
real OpenAI-compatible server on localhost whose replies come from that same model (retries, auth, order)."""

from __future__ import annotations

import copy
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from activations.errors import UserError
from activations.models import LoadedModel, load_model
from analysis.llm_backends import HTTPBackend, LocalBackend, backend_from_options

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Is Paris in France? Answer Yes or No."}],
    [{"role": "user", "content": "Count from one to five."}],
    [{"role": "user", "content": "Is the sea made of cheese? Answer Yes or No."}],
]
CHOICES = ["Yes", "No"]
MAX_TOKENS = 8
KEY_ENV = "SAELAB_TEST_LLM_KEY"


@pytest.fixture(scope="module")
def local() -> LocalBackend:
    """The embedded model on CPU, loaded once for the module."""
    return LocalBackend.from_loaded(load_model("smollm2-135m", device="cpu"), batch_size=4)


class FakeOpenAI(ThreadingHTTPServer):
    """An OpenAI chat-completions server on 127.0.0.1 answering with a LocalBackend, one conversation a request.

    `faults` are played on the first requests, in order: "drop" closes the connection without a response, an int
    answers with that HTTP status. `key` demands `Authorization: Bearer key`; `logprobs=False` never returns any.
    """

    daemon_threads = True

    def __init__(self, backend: LocalBackend, key: str | None = None, faults=(), logprobs: bool = True):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.backend, self.key, self.faults, self.logprobs = backend, key, list(faults), logprobs
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: list[str] = []
        self.lock = threading.Lock()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def log_message(self, format, *args) -> None:  # keep pytest's output clean
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        srv = self.server
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            fault = srv.faults.pop(0) if srv.faults else None
        try:
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # no status line at all: a dropped connection
                return
            if fault is not None:
                return self._json(fault, {"error": {"message": f"fault {fault}"}})
            if self.path != "/v1/chat/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            if srv.key is not None and self.headers.get("Authorization") != f"Bearer {srv.key}":
                return self._json(401, {"error": {"message": "invalid api key"}})
            assert payload["temperature"] == 0 and payload["model"] == "smol"
            messages = payload["messages"]
            with srv.lock:
                srv.seen.append(messages[-1]["content"])
            if payload.get("logprobs"):
                yes, no = srv.backend.choice_logprobs([messages], CHOICES)[0]
                top = [{"token": "Yes", "logprob": yes}, {"token": " no", "logprob": no}]  # a spacing/case variant
                text = "Yes" if yes >= no else "No"
                logprobs = {"content": [{"token": text, "logprob": max(yes, no), "top_logprobs": top}]}
            else:
                text = srv.backend.chat([messages], max_tokens=payload["max_tokens"])[0]
                logprobs = None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if srv.logprobs and logprobs is not None:
                choice["logprobs"] = logprobs
            self._json(200, {"object": "chat.completion", "model": "smol", "choices": [choice]})
        finally:
            with srv.lock:
                srv.in_flight -= 1


@pytest.fixture
def serve(local) -> Iterator:
    """Start FakeOpenAI servers in threads (port 0) and shut them down after the test."""
    servers: list[FakeOpenAI] = []

    def start(**kwargs) -> FakeOpenAI:
        srv = FakeOpenAI(local, **kwargs)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _one_by_one(local: LocalBackend, n: int = len(CONVERSATIONS)) -> list[str]:
    """The local replies to the first n conversations, one conversation a call, as the server computes them."""
    return [local.chat([c], max_tokens=MAX_TOKENS)[0] for c in CONVERSATIONS[:n]]


def test_local_chat_is_deterministic_and_non_empty(local):
    first = local.chat(CONVERSATIONS[:2], max_tokens=MAX_TOKENS)
    assert len(first) == 2 and all(isinstance(r, str) and r.strip() == r and r for r in first)
    assert local.chat(CONVERSATIONS[:2], max_tokens=MAX_TOKENS) == first
    assert "<|im_end|>" not in "".join(first) and "<|im_start|>" not in "".join(first)
    assert local.name == "local:smollm2-135m" and local.has_template


def test_local_choice_logprobs_match_a_plain_forward(local):
    """Batched, left-padded scoring equals log-softmax sums from one unpadded forward, for one- and two-token
    choices (the two-token one takes the other path: prompt plus its first token as input)."""
    tok = local.lm.tokenizer
    choices = ["Yes", "No", " maybe not"]
    assert len(tok(choices[2], add_special_tokens=False)["input_ids"]) == 2
    got = local.choice_logprobs(CONVERSATIONS, choices)
    assert len(got) == len(CONVERSATIONS) and all(len(row) == 3 for row in got)
    assert all(math.isfinite(v) and v <= 0 for row in got for v in row)
    for k in (0, 3):  # the shortest and a longer prompt: the short one is padded in its batch
        for j, choice in enumerate(choices):
            prompt = local.prompt_ids(CONVERSATIONS[k])
            ids = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = local.lm.model(torch.tensor([prompt + ids])).logits[0].float().log_softmax(-1)
            expected = sum(float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(ids))
            assert got[k][j] == pytest.approx(expected, abs=2e-3)
    full = LocalBackend.from_loaded(local.lm, batch_size=4)
    full._keeps_logits = False  # the path of models whose forward has no logits_to_keep: all logits, then sliced
    flat = [v for row in full.choice_logprobs(CONVERSATIONS, choices) for v in row]
    assert flat == pytest.approx([v for row in got for v in row], abs=1e-4)


def test_local_prompt_falls_back_without_chat_template(tiny_llama):
    tok = copy.deepcopy(tiny_llama.tokenizer)
    tok.chat_template = None
    backend = LocalBackend.from_loaded(LoadedModel(model=tiny_llama.model, tokenizer=tok, name="tiny"))
    text = tok.decode(backend.prompt_ids(CONVERSATIONS[1]))
    assert text.endswith("System: Answer briefly.\nUser: Name a colour.\nAssistant:")
    assert backend.count_tokens("Name a colour.") == len(tok("Name a colour.", add_special_tokens=False)["input_ids"])


def test_http_replies_equal_local_ones_in_order_and_in_parallel(local, serve):
    srv = serve()
    backend = HTTPBackend(srv.api_base + "/", "smol", api_key_env=None, concurrency=4)
    assert backend.name == f"http:smol@{srv.api_base}"
    assert backend.chat(CONVERSATIONS, max_tokens=MAX_TOKENS) == _one_by_one(local)
    assert srv.requests == len(CONVERSATIONS) and len(srv.seen) == len(CONVERSATIONS)
    assert 2 <= srv.max_in_flight <= 4  # requests overlapped, never more than the concurrency
    assert backend.count_tokens("x" * 10) == 3


def test_http_choice_logprobs_come_from_top_logprobs(local, serve):
    srv = serve()
    got = HTTPBackend(srv.api_base, "smol", api_key_env=None).choice_logprobs(CONVERSATIONS[2:], ["yes", "No", "Maybe"])
    expected = [local.choice_logprobs([c], CHOICES)[0] for c in CONVERSATIONS[2:]]
    for row, (yes, no) in zip(got, expected):
        assert row[0] == pytest.approx(yes, abs=1e-6) and row[1] == pytest.approx(no, abs=1e-6)  # " no" matches "No"
        assert row[2] == min(-30.0, yes, no)  # not listed: at most as likely as the least likely listed


def test_http_choice_logprobs_without_server_logprobs_fall_back_to_the_reply(serve):
    srv = serve(logprobs=False)
    got = HTTPBackend(srv.api_base, "smol", api_key_env=None).choice_logprobs(CONVERSATIONS[2:3], CHOICES)
    assert sorted(got[0]) == [-30.0, 0.0]


def test_http_retries_a_dropped_connection_and_a_503(local, serve):
    srv = serve(faults=["drop", 503])
    backend = HTTPBackend(srv.api_base, "smol", api_key_env=None, concurrency=1, retries=2, backoff=0.01)
    assert backend.chat(CONVERSATIONS[:1], max_tokens=MAX_TOKENS) == _one_by_one(local, 1)
    assert srv.requests == 3


def test_http_persistent_5xx_names_the_status(serve):
    srv = serve(faults=[500, 502, 503])
    with pytest.raises(UserError, match=r"kept answering HTTP 503 after 3 attempts"):
        HTTPBackend(srv.api_base, "smol", api_key_env=None, retries=2, backoff=0.01).chat(CONVERSATIONS[:1])
    assert srv.requests == 3


def test_http_401_is_a_user_error_without_retry(serve, monkeypatch):
    srv = serve(key="right-key")
    backend = HTTPBackend(srv.api_base, "smol", api_key_env=KEY_ENV, retries=3, backoff=0.01)
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    with pytest.raises(UserError) as err:
        backend.chat(CONVERSATIONS[:1], max_tokens=2)
    message = str(err.value)
    assert message == (
        f"the server at {srv.api_base}/chat/completions refused the API key in ${KEY_ENV} (HTTP 401); "
        f"set ${KEY_ENV} to a valid key."
    )
    assert "wrong-key" not in message and "\n" not in message and srv.requests == 1
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=rf"demands an API key \(HTTP 401\) but \${KEY_ENV} is not set"):
        backend.chat(CONVERSATIONS[:1], max_tokens=2)
    assert srv.requests == 2
    monkeypatch.setenv(KEY_ENV, "right-key")  # read at call time: the same backend now gets in
    assert backend.chat(CONVERSATIONS[:1], max_tokens=2)[0]


def test_http_wrong_path_is_a_user_error_without_retry(serve):
    srv = serve()
    base = srv.api_base.removesuffix("/v1")
    with pytest.raises(UserError, match=r"rejected the request \(HTTP 404: no route /chat/completions\)"):
        HTTPBackend(base, "smol", api_key_env=None, retries=3, backoff=0.01).chat(CONVERSATIONS[:1])
    assert srv.requests == 1


def test_http_unreachable_server_is_a_user_error_after_retries():
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    started = time.time()
    with pytest.raises(UserError) as err:
        HTTPBackend(url, "smol", api_key_env=None, retries=2, backoff=0.01, timeout=5).chat(CONVERSATIONS[:2])
    message = str(err.value)
    assert f"could not reach the server at {url}/chat/completions after 3 attempts" in message
    assert "--api-base" in message and "\n" not in message
    assert time.time() - started < 5


def test_backend_from_options_picks_http_or_local(tiny_llama_dir):
    http = backend_from_options("gpt-4o-mini", "https://example.invalid/v1", "OPENAI_API_KEY", None, concurrency=2)
    assert isinstance(http, HTTPBackend) and http.name == "http:gpt-4o-mini@https://example.invalid/v1"
    assert http.concurrency == 2
    local = backend_from_options(tiny_llama_dir, None, "OPENAI_API_KEY", "cpu")
    assert isinstance(local, LocalBackend) and local.name == f"local:{tiny_llama_dir}"
    with pytest.raises(UserError, match="not an http"):
        backend_from_options("m", "localhost:8000/v1", None, None)


def test_local_choice_logprobs_keep_absolute_positions_under_padding(tiny_gpt2):
    """GPT-2's learned absolute positions (unlike RoPE, blind to a uniform shift) see left padding unless the
    position ids start at each sequence's first real token: short and long prompts in one batch score (and generate)
    as they do alone."""
    backend = LocalBackend.from_loaded(tiny_gpt2, batch_size=8)
    conversations = [CONVERSATIONS[0], [{"role": "user", "content": "A much longer question " * 8 + "?"}]]
    batched = backend.choice_logprobs(conversations, CHOICES)
    alone = [backend.choice_logprobs([c], CHOICES)[0] for c in conversations]
    assert [v for row in batched for v in row] == pytest.approx([v for row in alone for v in row], abs=1e-4)
    assert backend.chat(conversations, max_tokens=4) == [backend.chat([c], max_tokens=4)[0] for c in conversations]


def test_local_slot_logprobs_match_a_plain_forward(local, tiny_gpt2):
    """Simulation's read-out: the digit distribution at each placeholder equals the log-softmax over those digits
    of one unpadded forward's full logits, for a short and a long reply batched together, on SmolLM2 (tied
    embeddings, RoPE) and on GPT-2 (absolute positions)."""
    digits = [str(d) for d in range(10)]
    conversations = [CONVERSATIONS[0], CONVERSATIONS[3]]
    replies = [["The\t", " cat\t"], ["One\t", " two\t", " three\t", "\n\t"]]
    for backend in (local, LocalBackend.from_loaded(tiny_gpt2, batch_size=4)):
        got = backend.slot_logprobs(conversations, replies, "unknown\n", digits)
        tok = backend.lm.tokenizer
        digit_ids = [tok(d, add_special_tokens=False)["input_ids"][0] for d in digits]
        for k, segments in enumerate(replies):
            ids = backend.prompt_ids(conversations[k])
            slots = []
            for segment in segments:
                ids = ids + tok(segment, add_special_tokens=False)["input_ids"]
                slots.append(len(ids) - 1)
                ids = ids + tok("unknown\n", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = backend.lm.model(torch.tensor([ids])).logits[0].float()
            expected = logits[slots][:, digit_ids].log_softmax(-1)
            assert torch.tensor(got[k]) == pytest.approx(expected, abs=2e-3)
    with pytest.raises(UserError, match="one token"):
        local.slot_logprobs(conversations, replies, "?", ["10", " maybe not"])
    assert HTTPBackend("http://127.0.0.1:9/v1", "m").slot_logprobs(conversations, replies, "?", digits) is None
